import Foundation
import MutualPKI
import Testing
import TestSupport
import X509

@Suite("The mutual command, run as a user runs it", .serialized)
struct CLITests {
    @Test("binary exists (build it with swift build first)")
    func binaryExists() {
        #expect(FileManager.default.isExecutableFile(atPath: CLI.binary), "missing \(CLI.binary)")
    }

    @Test("init, issue, sign, list, show, revoke, audit: the happy path")
    func happyPath() async throws {
        let cli = CLI()
        defer { cli.cleanup() }
        let state = cli.home + "/state"
        let initResult = try await cli.run(["init", "--state-dir", state, "--name", "Acme Internal CA", "--json"])
        #expect(initResult.status == 0, "\(initResult.output)")
        let initJSON = try JSONSerialization.jsonObject(with: Data(initResult.stdout.utf8)) as? [String: String]
        #expect(initJSON?["root_fingerprint"]?.count == 64)

        let issue = try await cli.run(["issue", "--profile", "server", "--dns", "api.test", "--ip", "127.0.0.1", "--owner", "team-api", "--out-dir", cli.home + "/srv"])
        #expect(issue.status == 0, "\(issue.output)")
        for file in ["key.pem", "cert.pem", "chain.pem", "root.pem"] {
            #expect(FileManager.default.fileExists(atPath: cli.home + "/srv/" + file))
        }
        let mode = try FileManager.default.attributesOfItem(atPath: cli.home + "/srv/key.pem")[.posixPermissions] as? Int
        #expect(mode == 0o600)

        let key = try KeyType.p256.generate()
        let csrPath = cli.home + "/req.der"
        try Data(TestPKI.der(TestPKI.csr(key: key, sans: [.uniformResourceIdentifier("spiffe://example.org/ns/a/sa/b")]))).write(to: URL(fileURLWithPath: csrPath))
        let sign = try await cli.run(["sign", "--profile", "workload", "--validity", "1h", csrPath, "--out", cli.home + "/w.pem", "--json"])
        #expect(sign.status == 0, "\(sign.output)")
        let signed = try JSONSerialization.jsonObject(with: Data(sign.stdout.utf8)) as? [String: Any]
        let serial = try #require(signed?["serial"] as? String)

        let list = try await cli.run(["list", "--identity", "spiffe://example.org/ns/a/sa/b", "--json"])
        #expect((try JSONSerialization.jsonObject(with: Data(list.stdout.utf8)) as? [Any])?.count == 1)
        let expiring = try await cli.run(["list", "--expiring-within", "2h"])
        #expect(expiring.stdout.contains(serial))
        #expect(!expiring.stdout.contains("api.test"), "the 30-day server certificate does not expire within 2h")

        let show = try await cli.run(["show", serial, "--pem"])
        #expect(show.stdout.hasPrefix("-----BEGIN CERTIFICATE-----"))

        let revoke = try await cli.run(["revoke", serial, "--reason", "keyCompromise"])
        #expect(revoke.status == 0, "\(revoke.output)")
        let revoked = try await cli.run(["list", "--status", "revoked", "--json"])
        #expect(revoked.stdout.contains(serial))
        let revokeAgain = try await cli.run(["revoke", serial, "--reason", "keyCompromise"])
        #expect(revokeAgain.status == 1)
        #expect(revokeAgain.stderr.contains("already revoked"))

        let audit = try await cli.run(["audit", "verify"])
        #expect(audit.status == 0, "\(audit.output)")
        #expect(audit.stdout.contains("intact"))
    }

    @Test("verify exits 0 on accept, 1 on reject with the reason, 2 on bad usage or input")
    func verifyExitCodes() async throws {
        let cli = CLI()
        defer { cli.cleanup() }
        #expect(try await cli.run(["init"]).status == 0)
        #expect(try await cli.run(["issue", "--profile", "client", "--cn", "alice", "--out-dir", cli.home + "/c"]).status == 0)
        let c = cli.home + "/c/"
        let ok = try await cli.run(["verify", "--roots", c + "root.pem", "--intermediates", c + "chain.pem", "--eku", "clientAuth", c + "cert.pem"])
        #expect(ok.status == 0, "\(ok.output)")
        let wrongEKU = try await cli.run(["verify", "--roots", c + "root.pem", "--intermediates", c + "chain.pem", "--eku", "serverAuth", c + "cert.pem"])
        #expect(wrongEKU.status == 1)
        #expect(wrongEKU.stdout.contains("does not allow serverAuth"))
        let future = try await cli.run(["verify", "--roots", c + "root.pem", "--intermediates", c + "chain.pem", "--time", "2099-01-01T00:00:00Z", c + "cert.pem"])
        #expect(future.status == 1)
        #expect(future.stdout.contains("expired"))

        try "garbage".write(toFile: cli.home + "/garbage.pem", atomically: true, encoding: .utf8)
        for arguments in [
            ["verify", "--roots", c + "root.pem", cli.home + "/garbage.pem"],
            ["verify", "--roots", cli.home + "/missing.pem", c + "cert.pem"],
            ["verify", "--roots", c + "root.pem", "--time", "yesterday", c + "cert.pem"],
            ["verify", "--roots", c + "root.pem", "--eku", "everything", c + "cert.pem"],
            ["verify", "--roots", c + "root.pem", "--crl", cli.home + "/garbage.pem", c + "cert.pem"],
            ["verify", "--roots", c + "root.pem", "--dns", "a", "--ip", "1.2.3.4", c + "cert.pem"],
            ["verify", "--roots", c + "root.pem"],
            ["verify", "--bogus-flag", c + "cert.pem"],
        ] {
            let result = try await cli.run(arguments)
            #expect(result.status == 2, "\(arguments.joined(separator: " ")): \(result.status) \(result.output)")
            #expect(!result.stderr.isEmpty)
        }
    }

    @Test("bench tls-floor refuses missing or garbage files and a bad --listen with exit 2, naming the flag")
    func tlsFloorBadInput() async throws {
        let cli = CLI()
        defer { cli.cleanup() }
        let garbage = cli.home + "/garbage.pem"
        try FileManager.default.createDirectory(atPath: cli.home, withIntermediateDirectories: true)
        try "garbage".write(toFile: garbage, atomically: true, encoding: .utf8)
        for (arguments, flag) in [
            (["--cert", cli.home + "/missing.pem", "--key", garbage, "--client-ca", garbage], "--cert"),
            (["--cert", garbage, "--key", garbage, "--client-ca", garbage], "--cert"),
            (["--listen", "nonsense", "--cert", garbage, "--key", garbage, "--client-ca", garbage], "--listen"),
        ] {
            let result = try await cli.run(["bench", "tls-floor"] + arguments)
            #expect(result.status == 2, "\(arguments): \(result.status) \(result.output)")
            #expect(result.stderr.contains(flag), "\(result.stderr)")
        }
    }

    @Test("serve refuses a bad --config file, bad ACME flags and duplicate provisioner names with exit 2; acme eab create refuses bad names")
    func serveACMEBadInput() async throws {
        let cli = CLI()
        defer { cli.cleanup() }
        let state = cli.home + "/state"
        #expect(try await cli.run(["init", "--state-dir", state, "--name", "ACME CLI"]).status == 0)
        let bad = cli.home + "/bad.yaml", dup = cli.home + "/dup.yaml"
        try "acme:\n  - name: web\n    chalenges: [http-01]\n".write(toFile: bad, atomically: true, encoding: .utf8)
        try "acme:\n  - name: web\n".write(toFile: dup, atomically: true, encoding: .utf8)
        for (arguments, expected) in [
            (["--config", bad], "acme[0].chalenges"),
            (["--config", cli.home + "/missing.yaml"], "missing.yaml"),
            (["--config", dup, "--acme", "web"], "distinct"),
            (["--acme", "Bad Name"], "provisioner name"),
            (["--acme", "web", "--acme-http-port", "0"], "--acme-http-port"),
            (["--acme", "web", "--acme-dns-resolver", "nowhere"], "--acme-dns-resolver"),
        ] {
            let result = try await cli.run(["serve", "--state-dir", state, "--listen", "127.0.0.1:0", "--http-listen", "off"] + arguments)
            #expect(result.status == 2, "\(arguments): \(result.status) \(result.output)")
            #expect(result.stderr.contains(expected), "\(arguments): \(result.stderr)")
        }
        let eab = try await cli.run(["acme", "eab", "create", "--state-dir", state, "--provisioner", "no such!", "--owner", "t"])
        #expect(eab.status != 0)
        let good = try await cli.run(["acme", "eab", "create", "--state-dir", state, "--provisioner", "web", "--owner", "team", "--json"])
        #expect(good.status == 0 && good.stdout.contains("hmac_key"))
        let list = try await cli.run(["acme", "eab", "list", "--state-dir", state, "--json"])
        #expect(list.status == 0 && !list.stdout.contains("hmac"), "the HMAC key is shown once only")
    }

    @Test("OAuth flags: bad rules, lifetimes, issuers and lone settings exit 2 with the reason before serving; proxy token flags and oauth commands refuse bad input")
    func oauthBadInput() async throws {
        let cli = CLI()
        defer { cli.cleanup() }
        let state = cli.home + "/state"
        #expect(try await cli.run(["init", "--state-dir", state, "--name", "OAuth CLI"]).status == 0)
        for (arguments, expected) in [
            (["--oauth-allow", "noequals"], "[oauth-bad-rule]"),
            (["--oauth-allow", "spiffe://td/**=aud"], "[oauth-bad-rule]"),
            (["--oauth-allow", "x=aud:re\"ad"], "scope"),
            (["--oauth-allow", "x=aud", "--oauth-token-lifetime", "2s"], "--oauth-token-lifetime"),
            (["--oauth-allow", "x=aud", "--oauth-token-lifetime", "48h"], "--oauth-token-lifetime"),
            (["--oauth-allow", "x=aud", "--oauth-issuer", "http://plain.example"], "--oauth-issuer"),
            (["--oauth-allow", "x=aud", "--oauth-introspector", "a b"], "--oauth-introspector"),
            (["--oauth-introspector", "spiffe://td/*"], "--oauth-allow"),
        ] {
            let result = try await cli.run(["serve", "--state-dir", state, "--listen", "127.0.0.1:0", "--http-listen", "off"] + arguments)
            #expect(result.status == 2, "\(arguments): \(result.status) \(result.output)")
            #expect(result.stderr.contains(expected), "\(arguments): \(result.stderr)")
            #expect(!result.stdout.contains("listening"), "\(arguments)")
        }
        #expect(!FileManager.default.fileExists(atPath: state + "/oauth/keys.json"), "no key made for a refused start")
        let proxyBase = ["proxy", "--listen", "127.0.0.1:0", "--upstream", "http://127.0.0.1:1", "--cert", "c", "--key", "k", "--client-ca", "ca", "--allow", "spiffe://td/a"]
        for (arguments, expected) in [
            (["--token-scope", "read"], "--token-audience"),
            (["--token-audience", "payments"], "--authority"),
        ] {
            let result = try await cli.run(proxyBase + arguments)
            #expect(result.status == 2 && result.stderr.contains(expected), "\(arguments): \(result.status) \(result.stderr)")
        }
        let missing = try await cli.run(["oauth", "token", "--authority", "https://127.0.0.1:1", "--cert", cli.home + "/none.pem", "--key", "k", "--ca", "c"])
        #expect(missing.status == 2 && missing.stderr.contains("--ca"), "\(missing.stderr)")
        let rotate = try await cli.run(["oauth", "keys", "rotate", "--state-dir", state, "--publish-ahead", "soon"])
        #expect(rotate.status == 2)
        let first = try await cli.run(["oauth", "keys", "rotate", "--state-dir", state, "--publish-ahead", "0"])
        #expect(first.status == 0, "\(first.output)")
        let again = try await cli.run(["oauth", "keys", "rotate", "--state-dir", state, "--publish-ahead", "10m"])
        let pending = try await cli.run(["oauth", "keys", "rotate", "--state-dir", state])
        #expect(again.status == 0 && pending.status == 1 && pending.stderr.contains("[rotation-in-progress]"), "\(pending.output)")
        let keys = try await cli.run(["oauth", "keys", "--state-dir", state, "--json"])
        #expect(keys.status == 0 && keys.stdout.contains("\"next\"") && keys.stdout.contains("\"active\""), "\(keys.output)")
    }

    @Test("dashboard login: prints a one-time link to where serve recorded its dashboard; bad input exits 2 and stores nothing")
    func dashboardLogin() async throws {
        let cli = CLI()
        defer { cli.cleanup() }
        let state = cli.home + "/state"
        #expect(try await cli.run(["init", "--state-dir", state, "--name", "Dashboard CLI"]).status == 0)
        for arguments in [["--ttl", "10s"], ["--ttl", "2d"], ["--ttl", "banana"], ["--session", "13h"], ["--as", "a b"], ["--as", "<x>"],
                          ["--url", "http://ca.example.org/dashboard/"], ["--url", "not a url"]] {
            let result = try await cli.run(["dashboard", "login", "--state-dir", state] + arguments)
            #expect(result.status == 2, "\(arguments): \(result.status) \(result.output)")
            #expect(result.stderr.contains(arguments[0]), "\(arguments): the message names the flag: \(result.stderr)")
        }
        let audit = try await cli.run(["audit", "list", "--state-dir", state, "--json"])
        #expect(!audit.stdout.contains("dashboard-login-create"), "a refused command stores no code")
        let good = try await cli.run(["dashboard", "login", "--state-dir", state, "--read-only", "--as", "auditor", "--url", "https://ca.example.org:9443/dashboard/", "--json"])
        #expect(good.status == 0, "\(good.output)")
        struct View: Decodable { var url: String; var role: String; var actor: String }
        let view = try JSONDecoder().decode(View.self, from: Data(good.stdout.utf8))
        #expect(view.url.hasPrefix("https://ca.example.org:9443/dashboard/login?code=mdl_"))
        #expect(view.role == "read-only")
        #expect(view.actor == "dashboard:auditor")
        let plain = try await cli.run(["dashboard", "login", "--state-dir", state])
        #expect(plain.stdout.hasPrefix("https://127.0.0.1:9443/dashboard/login?code=mdl_"), "the default before serve has recorded an address")
        let after = try await cli.run(["audit", "list", "--state-dir", state, "--json"])
        #expect(!after.stdout.contains(String(view.url.split(separator: "=").last ?? "")), "the code is not in the audit trail")
    }

    @Test("serve and proxy on a busy port: exit 2 naming the flag and the address, before saying they listen")
    func busyPorts() async throws {
        let cli = CLI()
        defer { cli.cleanup() }
        let busy = try BusyPort()
        let address = "127.0.0.1:\(busy.port)"
        #expect(try await cli.run(["init"]).status == 0)
        for (arguments, flag) in [
            (["--listen", address, "--http-listen", "127.0.0.1:0"], "--listen"),
            (["--listen", "127.0.0.1:0", "--http-listen", address], "--http-listen"),
        ] {
            let result = try await cli.run(["serve"] + arguments)
            #expect(result.status == 2, "\(arguments): \(result.status) \(result.output)")
            #expect(result.stderr.contains(flag + " " + address), "\(result.stderr)")
            #expect(!result.stdout.contains("listening"), "\(result.stdout)")
        }
        let out = cli.home + "/proxy"
        #expect(try await cli.run(["issue", "--out-dir", out, "--profile", "server", "--dns", "localhost"]).status == 0)
        let files = ["--cert", out + "/chain.pem", "--key", out + "/key.pem", "--client-ca", cli.home + "/state/ca/root.pem",
                     "--allow", "spiffe://example.org/x", "--upstream", "http://127.0.0.1:1"]
        for (arguments, flag) in [
            (["--listen", address], "--listen"),
            (["--listen", "127.0.0.1:0", "--admin-listen", address], "--admin-listen"),
        ] {
            let result = try await cli.run(["proxy"] + arguments + files)
            #expect(result.status == 2, "\(arguments): \(result.status) \(result.output)")
            #expect(result.stderr.contains(flag) && result.stderr.contains(address), "\(result.stderr)")
            #expect(!result.stderr.contains("listening"), "\(result.stderr)")
        }
    }

    @Test("CRL and OCSP URLs: a property of the CA set at init, the same from the CLI and serve; refused when unreachable, loud when loopback")
    func revocationURLs() async throws {
        let cli = CLI()
        defer { cli.cleanup() }
        let url = "http://ca.example.org:9080"
        #expect(try await cli.run(["init", "--http-public-url", url + "/"]).status == 0)
        let issued = try await cli.run(["issue", "--profile", "server", "--dns", "a.example.org", "--out-dir", cli.home + "/a"])
        #expect(issued.status == 0, "\(issued.output)")
        #expect(!issued.stderr.contains("[revocation-url-missing]"))
        let der = try PEMBundle.certificates(fromPEM: String(contentsOfFile: cli.home + "/a/cert.pem", encoding: .utf8))[0].derBytes
        let text = String(decoding: der, as: UTF8.self)
        #expect(text.contains(url + "/crl") && text.contains(url + "/ocsp"), "the CLI issues the URLs recorded at init")

        // serve keeps the recorded URL rather than its listener's loopback address, and a listener on every address is
        // fine once a URL is recorded.
        let served = try await cli.runDaemon(["serve", "--listen", "127.0.0.1:0", "--http-listen", "0.0.0.0:0"], until: "CRL and OCSP on")
        #expect(served.stdout.contains("CRL and OCSP on"), "\(served.output)")
        let config = try await cli.run(["config", "--json"])
        let object = try JSONSerialization.jsonObject(with: Data(config.stdout.utf8)) as? [String: String]
        #expect(object?["http_public_url"] == url && object?["http_public_url_source"] == "set", "\(config.output)")

        // Unreachable URLs are refused: the unspecified address, another scheme, garbage; nothing changes.
        for bad in ["http://0.0.0.0:9080", "http://[::]:9080", "ftp://ca.example.org", "http://", "not a url", "http://a.example.org/?q=1"] {
            let result = try await cli.run(["config", "--http-public-url", bad])
            #expect(result.status == 2, "\(bad): \(result.output)")
            #expect(result.stderr.contains("--http-public-url"), "\(result.stderr)")
        }
        #expect(try await cli.run(["config", "--json"]).stdout == config.stdout)

        // A CA with no URL yet: the CLI says its certificates carry none; serve on every address without a URL is refused
        // before listening; serve reachable from other hosts with a loopback URL warns.
        let fresh = CLI()
        defer { fresh.cleanup() }
        #expect(try await fresh.run(["init"]).status == 0)
        let bare = try await fresh.run(["issue", "--profile", "server", "--dns", "a.example.org", "--out-dir", fresh.home + "/a"])
        #expect(bare.status == 0 && bare.stderr.contains("[revocation-url-missing]"), "\(bare.output)")
        let refused = try await fresh.run(["serve", "--listen", "127.0.0.1:0", "--http-listen", "0.0.0.0:0"])
        #expect(refused.status == 2 && refused.stderr.contains("[revocation-url-unreachable]") && refused.stderr.contains("--http-public-url"), "\(refused.output)")
        #expect(!refused.stdout.contains("listening"))
        let loud = try await fresh.runDaemon(["serve", "--listen", "0.0.0.0:0", "--http-listen", "127.0.0.1:0"], until: "code=revocation-url-loopback")
        #expect(loud.stderr.contains("code=revocation-url-loopback"), "\(loud.output)")
        let quiet = try await fresh.runDaemon(["serve", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"], until: "CRL and OCSP on")
        #expect(quiet.stdout.contains("CRL and OCSP on") && !quiet.stderr.contains("revocation-url-loopback"), "an authority for this host only may point at itself: \(quiet.output)")
    }

    @Test("CLI promises: --json on verify, token revoke and root-crl; verify names SAN-only leaves, expects URIs, says when revocation was not checked, refuses a leaf as --roots; units in duration errors; trust-domain IDs are not workload IDs; sign writes the chain")
    func cliPromises() async throws {
        let cli = CLI()
        defer { cli.cleanup() }
        #expect(try await cli.run(["init"]).status == 0)
        let spiffe = "spiffe://example.org/ns/prod/sa/api"
        #expect(try await cli.run(["issue", "--profile", "workload", "--uri", spiffe, "--out-dir", cli.home + "/w"]).status == 0)
        let root = cli.home + "/w/root.pem", chain = cli.home + "/w/chain.pem", leaf = cli.home + "/w/cert.pem"
        func verify(_ extra: [String]) async throws -> (Int32, [String: Any]) {
            let result = try await cli.run(["verify", "--roots", root, "--intermediates", chain, "--json"] + extra + [leaf])
            let object = (try? JSONSerialization.jsonObject(with: Data(result.stdout.utf8))) as? [String: Any]
            #expect(object != nil, "verify --json printed no JSON: \(result.output)")
            return (result.status, object ?? [:])
        }
        var (status, report) = try await verify(["--uri", spiffe])
        #expect(status == 0 && report["result"] as? String == "accepted", "\(report)")
        #expect(report["identity"] as? String == spiffe, "a SAN-only leaf is named by its SAN")
        #expect((report["revocation"] as? String)?.hasPrefix("not checked") == true, "\(report)")
        (status, report) = try await verify(["--uri", "spiffe://example.org/ns/prod/sa/other"])
        #expect(status == 1 && report["result"] as? String == "rejected" && report["code"] as? String == "invalid", "\(report)")
        (status, report) = try await verify(["--check-revocation"])
        #expect(status == 1 && report["code"] as? String == "revocation_unavailable", "no OCSP URL to ask: \(report)")
        let human = try await cli.run(["verify", "--roots", root, "--intermediates", chain, leaf])
        #expect(human.status == 0 && human.stdout.hasPrefix("OK: \(spiffe)") && human.stdout.contains("revocation: not checked"), "\(human.output)")

        let leafAsRoot = try await cli.run(["verify", "--roots", leaf, leaf])
        #expect(leafAsRoot.status == 2 && leafAsRoot.stderr.contains("--roots"), "bad usage, naming the flag: \(leafAsRoot.output)")
        #expect(!leafAsRoot.output.contains("Certificate("), "no internal structures: \(leafAsRoot.output)")

        let token = try await cli.run(["token", "create", "--scope", "a.example.org", "--json"])
        let id = try #require((try JSONSerialization.jsonObject(with: Data(token.stdout.utf8)) as? [String: Any])?["id"] as? String)
        let revoked = try await cli.run(["token", "revoke", id, "--json"])
        #expect((try? JSONSerialization.jsonObject(with: Data(revoked.stdout.utf8)) as? [String: String]) == ["id": id, "status": "revoked"], "\(revoked.output)")
        let rootCRL = try await cli.run(["root-crl", "--json"])
        let crl = (try? JSONSerialization.jsonObject(with: Data(rootCRL.stdout.utf8))) as? [String: String]
        #expect(crl?["number"] != nil && crl?["next_update"] != nil, "\(rootCRL.output)")

        let badDuration = try await cli.run(["issue", "--profile", "server", "--dns", "a.example.org", "--validity", "1y", "--out-dir", cli.home + "/x"])
        #expect(badDuration.status == 2 && badDuration.stderr.contains("s, m, h, d, w"), "\(badDuration.output)")
        let trustDomain = try await cli.run(["issue", "--profile", "workload", "--uri", "spiffe://example.org", "--out-dir", cli.home + "/y"])
        #expect(trustDomain.status == 1, "refused, not issued (the code, invalid-name, is checked in IssuanceTests): \(trustDomain.output)")
        #expect(!FileManager.default.fileExists(atPath: cli.home + "/y/cert.pem"))

        // show by a serial prefix, as list prints it; garbage and short prefixes are refused.
        let listed = try await cli.run(["list", "--identity", "spiffe://example.org/ns/prod/*", "--json"])
        let rows = (try? JSONSerialization.jsonObject(with: Data(listed.stdout.utf8))) as? [[String: Any]] ?? []
        #expect(rows.count == 1, "identity pattern: \(listed.output)")
        let fullSerial = try #require(rows.first?["serial"] as? String)
        let shown = try await cli.run(["show", String(fullSerial.prefix(12)), "--json"])
        #expect(shown.status == 0 && shown.stdout.contains(fullSerial), "\(shown.output)")
        #expect(try await cli.run(["show", "zz-not-hex"]).status == 2)
        #expect(try await cli.run(["show", String(fullSerial.prefix(3))]).status == 1)

        let key = cli.home + "/c.key", csr = cli.home + "/c.csr"
        let openssl = Process()
        openssl.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
        openssl.arguments = ["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-subj", "/CN=alice", "-out", csr]
        openssl.standardError = FileHandle.nullDevice
        try openssl.run()
        openssl.waitUntilExit()
        let signed = try await cli.run(["sign", "--profile", "client", csr, "--out", cli.home + "/c.pem", "--chain-out", cli.home + "/c-chain.pem"])
        #expect(signed.status == 0, "\(signed.output)")
        let written = try PEMBundle.certificates(fromPEM: String(contentsOfFile: cli.home + "/c-chain.pem", encoding: .utf8))
        #expect(written.count == 2 && written[1].subject != written[0].subject, "leaf then intermediate")
    }

    @Test("the default state directory ~/.mutual follows $HOME, as the shell's ~ does")
    func homeStateDirectory() async throws {
        let cli = CLI()
        defer { cli.cleanup() }
        let result = try await cli.run(["init", "--json"], environment: ["MUTUAL_STATE_DIR": ""])
        #expect(result.status == 0, "\(result.output)")
        let object = (try? JSONSerialization.jsonObject(with: Data(result.stdout.utf8))) as? [String: String]
        #expect(object?["state_dir"] == cli.home + "/.mutual", "\(result.output)")
        #expect(FileManager.default.fileExists(atPath: cli.home + "/.mutual/ca/root.pem"))
    }

    @Test("doctor files and doctor proxy: exit 0 healthy, 1 with findings by code, 2 on unreadable input")
    func doctor() async throws {
        let cli = CLI()
        defer { cli.cleanup() }
        #expect(try await cli.run(["init"]).status == 0)
        #expect(try await cli.run(["issue", "--profile", "server", "--dns", "api.example.org", "--out-dir", cli.home + "/api"]).status == 0)
        let root = cli.home + "/state/ca/root.pem", api = cli.home + "/api"
        let healthy = try await cli.run(["doctor", "files", "--cert", api + "/chain.pem", "--key", api + "/key.pem", "--ca", root, "--purpose", "server", "--dns", "api.example.org"])
        #expect(healthy.status == 0, "\(healthy.output)")
        func codes(_ arguments: [String]) async throws -> (Int32, [String]) {
            let result = try await cli.run(arguments + ["--json"])
            let object = (try? JSONSerialization.jsonObject(with: Data(result.stdout.utf8))) as? [String: Any]
            let findings = object?["findings"] as? [[String: Any]] ?? []
            return (result.status, findings.compactMap { $0["code"] as? String })
        }
        chmod(api + "/key.pem", 0o644)
        let (status, found) = try await codes(["doctor", "files", "--cert", api + "/cert.pem", "--key", api + "/key.pem", "--ca", root, "--purpose", "client"])
        #expect(status == 1 && Set(found) == ["missing-intermediate", "wrong-eku", "key-file-permissions"], "\(found)")
        try "garbage".write(toFile: cli.home + "/g.pem", atomically: true, encoding: .utf8)
        #expect(try await cli.run(["doctor", "files", "--cert", cli.home + "/g.pem"]).status == 2)
        #expect(try await cli.run(["doctor", "files", "--cert", cli.home + "/missing.pem"]).status == 2)
        // --crl: garbage, a truncated DER CRL, a PEM without a CRL block and a missing file are usage errors (2) that
        // name the flag; the root CRL alone leaves the issuing CA's level without a CRL (crl-missing, 1).
        let rootCRL = try await cli.run(["root-crl", "--json"])
        let crlPath = ((try? JSONSerialization.jsonObject(with: Data(rootCRL.stdout.utf8))) as? [String: Any])?["path"] as? String ?? ""
        let crlPEM = try String(contentsOfFile: crlPath, encoding: .utf8)
        let der = try RevocationList.pemDocuments(crlPEM)[0]
        try Data(der.prefix(der.count / 2)).write(to: URL(fileURLWithPath: cli.home + "/truncated.crl"))
        for bad in [cli.home + "/g.pem", cli.home + "/truncated.crl", api + "/cert.pem", cli.home + "/missing.crl"] {
            let result = try await cli.run(["doctor", "files", "--cert", api + "/chain.pem", "--crl", bad])
            #expect(result.status == 2 && result.output.contains("--crl"), "\(bad): \(result.output)")
        }
        let (crlStatus, crlFound) = try await codes(["doctor", "files", "--cert", api + "/chain.pem", "--ca", root, "--crl", crlPath])
        #expect(crlStatus == 1 && crlFound == ["crl-missing"], "\(crlFound)")

        // A proxy configuration with a leaf-only certificate and an open key; then one that does not parse.
        let yaml = """
            listeners:
              - listen: 127.0.0.1:0
                upstream: http://127.0.0.1:1
                cert: \(api)/cert.pem
                key: \(api)/key.pem
                client-ca: \(root)
                allow: ["spiffe://example.org/*"]
            """
        try yaml.write(toFile: cli.home + "/proxy.yaml", atomically: true, encoding: .utf8)
        let (proxyStatus, proxyFound) = try await codes(["doctor", "proxy", "--config", cli.home + "/proxy.yaml"])
        #expect(proxyStatus == 1 && Set(proxyFound) == ["missing-intermediate", "key-file-permissions"], "\(proxyFound)")
        // mutual proxy says the same at start-up, in its log, with the code.
        let started = try await cli.runDaemon(["proxy", "--config", cli.home + "/proxy.yaml"], until: "code=missing-intermediate")
        #expect(started.stderr.contains("listening") && started.stderr.contains("code=missing-intermediate") && started.stderr.contains("code=key-file-permissions"), "\(started.stderr)")
        try "listeners: [ {listen: nowhere} ]".write(toFile: cli.home + "/bad.yaml", atomically: true, encoding: .utf8)
        let (badStatus, badFound) = try await codes(["doctor", "proxy", "--config", cli.home + "/bad.yaml"])
        #expect(badStatus == 1 && badFound == ["config-invalid"], "\(badFound)")
    }

    @Test("bench ca-server refuses an unknown --stage and a bad --listen with exit 2 before starting")
    func caServerBadInput() async throws {
        let cli = CLI()
        defer { cli.cleanup() }
        for (arguments, expected) in [
            (["--stage", "everything"], "'full', 'sign' or 'http'"),
            (["--stage", ""], "--stage"),
            (["--listen", "nonsense"], "invalid listen address 'nonsense'"),
            (["--listen", "127.0.0.1:99999"], "invalid listen address"),
        ] {
            let result = try await cli.run(["bench", "ca-server"] + arguments)
            #expect(result.status == 2, "\(arguments): \(result.status) \(result.output)")
            #expect(result.stderr.contains(expected), "\(arguments): \(result.stderr)")
        }
    }

    @Test("bad input to sign and issue: one-line error, non-zero exit, nothing recorded")
    func badInputChangesNothing() async throws {
        let cli = CLI()
        defer { cli.cleanup() }
        let state = cli.home + "/state"
        #expect(try await cli.run(["init", "--permit-dns", "example.org"]).status == 0)
        let before = try await cli.snapshot(state)

        let key = try KeyType.p256.generate()
        let good = try TestPKI.der(TestPKI.csr(key: key, commonName: "x", sans: [.dnsName("a.example.org")]))
        var badSignature = good
        badSignature[badSignature.count - 2] ^= 0xFF
        let files: [(String, Data)] = [
            ("garbage.csr", Data("this is not a CSR".utf8)),
            ("truncated.csr", Data(good.prefix(good.count / 2))),
            ("oversized.csr", Data(repeating: 0x30, count: 70 * 1024)),
            ("badsig.csr", Data(badSignature)),
            ("empty.csr", Data()),
            ("outside.csr", Data(try TestPKI.der(TestPKI.csr(key: key, sans: [.dnsName("evil.test")])))),
        ]
        for (name, data) in files {
            try data.write(to: URL(fileURLWithPath: cli.home + "/" + name))
            let result = try await cli.run(["sign", "--profile", "server", cli.home + "/" + name, "--out", cli.home + "/out.pem"])
            #expect(result.status != 0, "\(name) was accepted")
            #expect(result.stderr.split(separator: "\n").count == 1, "\(name): \(result.stderr)")
            #expect(!FileManager.default.fileExists(atPath: cli.home + "/out.pem"))
        }
        let refusals: [[String]] = [
            ["sign", "--profile", "superuser", cli.home + "/garbage.csr", "--out", cli.home + "/o.pem"],
            ["issue", "--profile", "workload", "--uri", "https://not-spiffe.test", "--out-dir", cli.home + "/o"],
            ["issue", "--profile", "server", "--dns", "bad_name.example.org", "--out-dir", cli.home + "/o"],
            ["issue", "--profile", "server", "--dns", "evil.test", "--out-dir", cli.home + "/o"],
            ["issue", "--profile", "client", "--cn", "x", "--validity", "400d", "--out-dir", cli.home + "/o"],
            ["issue", "--profile", "client", "--cn", "x", "--validity", "forever", "--out-dir", cli.home + "/o"],
            ["issue", "--profile", "client", "--cn", "x", "--key-type", "dsa", "--out-dir", cli.home + "/o"],
            ["revoke", "deadbeef", "--reason", "keyCompromise"],
            ["revoke", "deadbeef", "--reason", "because"],
            ["show", "deadbeef"],
        ]
        for arguments in refusals {
            let result = try await cli.run(arguments)
            #expect(result.status != 0, "\(arguments.joined(separator: " ")) succeeded")
            #expect(!result.stderr.isEmpty)
        }
        #expect(!FileManager.default.fileExists(atPath: cli.home + "/o/cert.pem"))
        let after = try await cli.snapshot(state)
        #expect(before.certificates == after.certificates && before.events == after.events)
    }

    @Test("missing or corrupt state directories and wrong passphrases are named")
    func stateErrors() async throws {
        let cli = CLI()
        defer { cli.cleanup() }
        let missing = try await cli.run(["list", "--state-dir", cli.home + "/nothing"])
        #expect(missing.status == 1)
        #expect(missing.stderr.contains("mutual init"))

        let encrypted = cli.home + "/enc"
        #expect(try await cli.run(["init", "--state-dir", encrypted], environment: ["MUTUAL_PASSPHRASE": "right"]).status == 0)
        let wrong = try await cli.run(["list", "--state-dir", encrypted], environment: ["MUTUAL_PASSPHRASE": "wrong"])
        #expect(wrong.status == 1)
        #expect(wrong.stderr.contains("wrong passphrase"))
        let none = try await cli.run(["list", "--state-dir", encrypted])
        #expect(none.stderr.contains("MUTUAL_PASSPHRASE"))
        #expect(try await cli.run(["list", "--state-dir", encrypted], environment: ["MUTUAL_PASSPHRASE": "right"]).status == 0)

        let reinit = try await cli.run(["init", "--state-dir", encrypted])
        #expect(reinit.status == 1)
        #expect(reinit.stderr.contains("refusing to overwrite"))

        // Corrupt database file: refused, named, not replaced.
        let corrupt = cli.home + "/corrupt"
        #expect(try await cli.run(["init", "--state-dir", corrupt]).status == 0)
        let garbage = Data((0..<8192).map { UInt8(($0 * 7) % 256) })
        try? FileManager.default.removeItem(atPath: corrupt + "/mutual.db-wal")
        try? FileManager.default.removeItem(atPath: corrupt + "/mutual.db-shm")
        try garbage.write(to: URL(fileURLWithPath: corrupt + "/mutual.db"))
        let result = try await cli.run(["list", "--state-dir", corrupt])
        #expect(result.status == 1)
        #expect(result.stderr.contains("mutual.db"))
        #expect(try Data(contentsOf: URL(fileURLWithPath: corrupt + "/mutual.db")) == garbage)
    }

    @Test("bad database URLs, listen addresses and a missing root key: one-line errors, nothing changed")
    func serveAndDatabaseInputErrors() async throws {
        let cli = CLI()
        defer { cli.cleanup() }
        let state = cli.home + "/state"
        #expect(try await cli.run(["init"]).status == 0)
        let before = try await cli.snapshot(state)
        let cases: [([String], Int32, String)] = [
            (["list", "--database", "postgres://nobody@127.0.0.1:1/x?tlsmode=disable"], 1, "Connection refused"),
            (["list", "--database", "postgres://%%%"], 1, "invalid PostgreSQL URL"),
            (["serve", "--listen", "garbage"], 2, "invalid listen address"),
            (["serve", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:99999"], 2, "invalid listen address"),
            (["serve", "--listen", "127.0.0.1:0", "--http-public-url", "ftp://x"], 2, "--http-public-url"),
            (["serve", "--listen", "127.0.0.1:0", "--public-url", "http://not-https"], 2, "--public-url"),
        ]
        for (arguments, status, message) in cases {
            let result = try await cli.run(arguments)
            #expect(result.status == status, "\(arguments): \(result.status) \(result.output)")
            #expect(result.stderr.contains(message), "\(arguments): \(result.stderr)")
            #expect(result.stderr.split(separator: "\n").count == 1, "\(arguments): one line")
        }
        // The root CRL needs the root key: without it, a clear error and the CRL file untouched.
        let rootCRL = try String(contentsOfFile: state + "/ca/root-crl.pem", encoding: .utf8)
        try FileManager.default.moveItem(atPath: state + "/ca/root.key", toPath: cli.home + "/root.key.offline")
        let missing = try await cli.run(["root-crl"])
        #expect(missing.status != 0)
        #expect(missing.stderr.contains("root key"))
        #expect(try String(contentsOfFile: state + "/ca/root-crl.pem", encoding: .utf8) == rootCRL)
        try "-----BEGIN PRIVATE KEY-----\ngarbage\n".write(toFile: state + "/ca/root.key", atomically: true, encoding: .utf8)
        let corrupt = try await cli.run(["root-crl"])
        #expect(corrupt.status != 0)
        #expect(try String(contentsOfFile: state + "/ca/root-crl.pem", encoding: .utf8) == rootCRL)
        try FileManager.default.removeItem(atPath: state + "/ca/root.key")
        try FileManager.default.moveItem(atPath: cli.home + "/root.key.offline", toPath: state + "/ca/root.key")
        let signed = try await cli.run(["root-crl"])
        #expect(signed.status == 0 && signed.stdout.contains("root CRL #2"), "\(signed.output)")
        let after = try await cli.snapshot(state)
        #expect(before.certificates == after.certificates && before.events == after.events)
    }

    @Test("a name-constrained CA: serve on an IP needs --public-url with a permitted name, and says so")
    func serveWithNameConstraints() async throws {
        let cli = CLI()
        defer { cli.cleanup() }
        #expect(try await cli.run(["init", "--permit-dns", "svc.acme.test"]).status == 0)
        let refused = try await cli.run(["serve", "--listen", "127.0.0.1:0", "--http-listen", "off"])
        #expect(refused.status == 1)
        #expect(refused.stderr.contains("--public-url"), "\(refused.stderr)")
        // With a permitted name the server starts (the IP SAN is left out); it is stopped at once.
        let process = Process()
        process.executableURL = URL(fileURLWithPath: CLI.binary)
        process.arguments = ["serve", "--listen", "127.0.0.1:0", "--http-listen", "off", "--public-url", "https://ca.svc.acme.test:9443"]
        process.environment = ["HOME": cli.home, "MUTUAL_STATE_DIR": cli.home + "/state", "PATH": "/usr/bin:/bin"]
        FileManager.default.createFile(atPath: cli.home + "/serve.out", contents: nil)
        let out = try FileHandle(forWritingTo: URL(fileURLWithPath: cli.home + "/serve.out"))
        process.standardOutput = out
        process.standardError = FileHandle.nullDevice
        try process.run()
        var started = false
        for _ in 0..<200 where !started {
            try await Task.sleep(for: .milliseconds(50))
            started = ((try? String(contentsOfFile: cli.home + "/serve.out", encoding: .utf8)) ?? "").contains("listening on https://")
            if !process.isRunning { break }
        }
        #expect(started, "serve did not start with a permitted public name")
        process.terminate()
        while process.isRunning { try await Task.sleep(for: .milliseconds(50)) }
        try out.close()
    }

    @Test("audit verify fails, naming the event, after someone edits the database")
    func auditTamper() async throws {
        let cli = CLI()
        defer { cli.cleanup() }
        let state = cli.home + "/state"
        #expect(try await cli.run(["init"]).status == 0)
        #expect(try await cli.run(["issue", "--profile", "client", "--cn", "a", "--out-dir", cli.home + "/a"]).status == 0)
        let sqlite = Process()
        sqlite.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        sqlite.arguments = ["python3", "-c", "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute(\"UPDATE audit_events SET actor='mallory' WHERE sequence=2\"); c.commit()", state + "/mutual.db"]
        try sqlite.run()
        sqlite.waitUntilExit()
        #expect(sqlite.terminationStatus == 0)
        let result = try await cli.run(["audit", "verify"])
        #expect(result.status == 1)
        #expect(result.stderr.contains("event #2"))
    }

    @Test("quickstart runs the whole story: sidecar proxy with an agent identity, client over mTLS, refusals, revocation, audit")
    func quickstart() async throws {
        let cli = CLI()
        defer { cli.cleanup() }
        let started = Date.now
        let result = try await cli.run(["quickstart"])
        #expect(result.status == 0, "\(result.output)")
        #expect(result.stdout.contains("the app saw: hello spiffe://quickstart.test/ns/demo/sa/client"))
        #expect(result.stdout.contains("Call without a client certificate: refused"))
        #expect(result.stdout.contains("Call as spiffe://quickstart.test/ns/other/sa/intruder: 403"))
        #expect(result.stdout.contains("later its next call was refused"))
        #expect(result.stdout.contains("revoked  spiffe://quickstart.test/ns/demo/sa/client"))
        #expect(result.stdout.contains("audit trail intact"))
        #expect(Date.now.timeIntervalSince(started) < 30)
    }

    @Test("serve: token create --json, enrollment with curl, graceful stop on SIGTERM")
    func serveAndStop() async throws {
        let cli = CLI()
        defer { cli.cleanup() }
        #expect(try await cli.run(["init"]).status == 0)
        let tokenResult = try await cli.run(["token", "create", "--scope", "*.svc.example.org", "--profile", "server", "--uses", "2", "--json"])
        #expect(tokenResult.status == 0, "\(tokenResult.output)")
        let tokenJSON = try JSONSerialization.jsonObject(with: Data(tokenResult.stdout.utf8)) as? [String: Any]
        let token = try #require(tokenJSON?["token"] as? String)
        #expect(tokenJSON?["id"] as? String != nil)
        let list = try await cli.run(["token", "list"])
        #expect(list.stdout.contains("0/2"))
        #expect(!list.stdout.contains(token), "secrets are never listed")
        for bad in [["token", "create"], ["token", "create", "--scope", "a*b"], ["token", "create", "--scope", "x", "--uses", "0"],
                    ["token", "create", "--scope", "x", "--max-validity", "400d"], ["token", "revoke", "0000000000000000"]] {
            let result = try await cli.run(bad)
            #expect(result.status != 0, "\(bad)")
            #expect(!result.stderr.isEmpty)
        }

        let process = Process()
        process.executableURL = URL(fileURLWithPath: CLI.binary)
        process.arguments = ["serve", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"]
        process.environment = ["HOME": cli.home, "MUTUAL_STATE_DIR": cli.home + "/state", "PATH": "/usr/bin:/bin"]
        let out = Pipe()
        process.standardOutput = out
        process.standardError = FileHandle.nullDevice
        try process.run()
        defer { if process.isRunning { process.terminate() } }
        var port = 0
        var buffer = ""
        let deadline = Date.now.addingTimeInterval(20)
        while port == 0 && Date.now < deadline {
            var chunk = [UInt8](repeating: 0, count: 4096)
            let n = chunk.withUnsafeMutableBytes { read(out.fileHandleForReading.fileDescriptor, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            buffer += String(decoding: chunk[0..<n], as: UTF8.self)
            if let range = buffer.range(of: #"127\.0\.0\.1:(\d+)"#, options: .regularExpression) {
                port = Int(buffer[range].split(separator: ":").last ?? "") ?? 0
            }
        }
        #expect(port > 0, "serve did not report its port: \(buffer)")

        let csrKey = cli.home + "/k.pem"
        let csr = cli.home + "/r.csr"
        let openssl = Process()
        openssl.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
        openssl.arguments = ["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", csrKey,
                             "-subj", "/CN=api.svc.example.org", "-addext", "subjectAltName=DNS:api.svc.example.org", "-out", csr]
        openssl.standardError = FileHandle.nullDevice
        try openssl.run()
        openssl.waitUntilExit()
        let body = try JSONSerialization.data(withJSONObject: ["csr": try String(contentsOfFile: csr, encoding: .utf8)])
        try body.write(to: URL(fileURLWithPath: cli.home + "/body.json"))
        let curl = Process()
        curl.executableURL = URL(fileURLWithPath: "/usr/bin/curl")
        curl.arguments = ["-s", "--max-time", "10", "--cacert", cli.home + "/state/ca/root.pem", "-H", "Authorization: Bearer \(token)",
                          "-H", "Content-Type: application/json", "--data-binary", "@" + cli.home + "/body.json", "https://127.0.0.1:\(port)/v1/sign"]
        FileManager.default.createFile(atPath: cli.home + "/curl.out", contents: nil)
        let curlOut = try FileHandle(forWritingTo: URL(fileURLWithPath: cli.home + "/curl.out"))
        curl.standardOutput = curlOut
        try curl.run()
        curl.waitUntilExit()
        try curlOut.close()
        let response = (try? Data(contentsOf: URL(fileURLWithPath: cli.home + "/curl.out"))) ?? Data()
        let issued = try JSONSerialization.jsonObject(with: response) as? [String: Any]
        #expect((issued?["certificate"] as? String)?.contains("BEGIN CERTIFICATE") == true, "\(String(decoding: response, as: UTF8.self))")

        process.terminate()  // SIGTERM
        let stopDeadline = Date.now.addingTimeInterval(10)
        while process.isRunning && Date.now < stopDeadline { try await Task.sleep(for: .milliseconds(50)) }
        #expect(!process.isRunning, "serve did not stop within 10 s of SIGTERM")
        #expect(process.terminationStatus == 0, "graceful stop exits 0")
    }
}
