import Foundation
import MutualAuthority
import MutualPKI
@testable import MutualServer
import Testing

@Suite("mutual serve --config: the authority's YAML file, strict about every key (in memory)")
struct AuthorityFileTests {
    @Test("a full file: server settings and two provisioners with every option")
    func full() throws {
        let file = try AuthorityFile.parse(yaml: """
            listen: 127.0.0.1:8443
            dashboard: false
            http-listen: off
            public-url: https://ca.example.org:8443
            crl-validity: 12h
            log-level: debug
            acme:
              - name: web
                identifiers: [dns]
                dns-names: [example.org, .internal.example.org]
                validity: 3d
                challenges: [http-01, dns-01]
                dns-resolver: 127.0.0.1:5353
                external-account-required: true
                http-port: 8080
                terms-of-service: https://ca.example.org/terms
                rate-limits:
                  orders-per-account-per-hour: 10
                  certificates-per-identifier-per-hour: none
              - name: devices
                identifiers: [ip]
                profiles: [client, server]
                tls-port: 8443
            """)
        #expect(file.listen == "127.0.0.1:8443" && file.httpListen == "off" && file.logLevel == "debug")
        #expect(file.dashboard == false)
        #expect(file.crlValidity == .hours(12))
        #expect(file.acme.map(\.name) == ["web", "devices"])
        let web = file.acme[0]
        #expect(web.allowDNS && !web.allowIP && web.permittedDNS == ["example.org", "internal.example.org"])
        #expect(web.validity == .days(3) && web.challenges == ["http-01", "dns-01"] && web.dnsResolver == "127.0.0.1:5353")
        #expect(web.requireEAB && web.httpPort == 8080 && web.termsOfService == "https://ca.example.org/terms")
        #expect(web.ordersPerAccountPerHour == 10 && web.certificatesPerIdentifierPerHour == nil)
        let devices = file.acme[1]
        #expect(devices.profiles == [.client, .server] && !devices.allowDNS && devices.tlsPort == 8443)
        #expect(devices.challenges == ["http-01", "tls-alpn-01"], "the safe defaults")
        #expect(try AuthorityFile.parse(yaml: "") == AuthorityFile())
    }

    @Test("every YAML example in docs/acme.md is a file mutual serve --config accepts")
    func documentedExamples() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let lines = try String(contentsOf: root.appendingPathComponent("docs/acme.md"), encoding: .utf8).components(separatedBy: "\n")
        var blocks: [String] = []
        var current: [String]?
        for line in lines {
            let trimmed = line.trimmingCharacters(in: .whitespaces)
            if current == nil, trimmed == "```yaml" { current = [] } else if current != nil, trimmed == "```" {
                blocks.append(current!.joined(separator: "\n"))
                current = nil
            } else if current != nil { current!.append(line) }
        }
        #expect(!blocks.isEmpty)
        for block in blocks {
            let file = try AuthorityFile.parse(yaml: block)
            #expect(!file.acme.isEmpty)
        }
    }

    @Test("mistakes are refused with their path: unknown keys, wrong types, dns-01 without a resolver, duplicate names, bad values, garbage")
    func mistakes() throws {
        let cases: [(String, String)] = [
            ("lisen: 127.0.0.1:1", "lisen"),
            ("acme:\n  - name: a\n    chalenges: [http-01]", "acme[0].chalenges"),
            ("acme:\n  - name: a\n    rate-limits: {orders: 3}", "acme[0].rate-limits.orders"),
            ("acme:\n  - name: a\n    challenges: [dns-01]", "acme[0].challenges"),
            ("acme:\n  - name: a\n    challenges: [http-02]", "acme[0].challenges"),
            ("acme:\n  - name: a\n  - name: a", "acme"),
            ("acme:\n  - identifiers: [dns]", "acme[0].name"),
            ("acme:\n  - name: A B", "acme[0].name"),
            ("acme:\n  - name: a\n    http-port: 70000", "acme[0].http-port"),
            ("acme:\n  - name: a\n    validity: forever", "acme[0].validity"),
            ("acme:\n  - name: a\n    profile: workload", "acme[0].profile"),
            ("acme:\n  - name: a\n    profiles: [server, server]", "acme[0].profiles"),
            ("acme:\n  - name: a\n    profile: server\n    profiles: [client]", "acme[0].profiles"),
            ("acme:\n  - name: a\n    external-account-required: maybe", "acme[0].external-account-required"),
            ("acme:\n  - name: a\n    dns-names: [bad_name]", "acme[0].dns-names"),
            ("acme: {name: a}", "acme"),
            ("listen: nowhere", "listen"),
            ("log-level: loud", "log-level"),
            ("dashboard: maybe", "dashboard"),
            ("dashboard: {on: true}", "dashboard"),
            ("- just\n- a list", ""),
            ("listen: [unclosed", ""),
        ]
        for (yaml, path) in cases {
            do {
                _ = try AuthorityFile.parse(yaml: yaml)
                Issue.record("accepted: \(yaml)")
            } catch let problem as AuthorityFile.Problem {
                #expect(problem.path == path, "\(yaml) → \(problem)")
            }
        }
        #expect(throws: AuthorityFile.Problem.self) { try AuthorityFile.parse(yaml: String(repeating: "#", count: AuthorityFile.maximumSize + 1)) }
    }
}
