import ArgumentParser
import Foundation
import MutualAuthority
import MutualPKCS11
import MutualPKI
import MutualStore

struct InitCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "init",
        abstract: "Create a private CA: a root and an issuing intermediate (path length 0).",
        discussion: """
            Writes ca/root.pem, ca/root.key, ca/intermediate.pem, ca/intermediate.key (keys mode 0600), the SQLite
            inventory mutual.db, config.json and an admin client certificate in admin/. Keys are encrypted with a
            passphrase when MUTUAL_PASSPHRASE is set or --encrypt-keys is given (then you are prompted).
            Prints the SHA-256 fingerprint of the root, which agents pin with --root-fingerprint.
            With --key-type ml-dsa-65 or ml-dsa-87 it also writes ca/pq-root.pem, ca/pq-intermediate.pem and their keys.
            """
    )

    @OptionGroup var stateOptions: StateOptions

    @Option(help: "Name of the CA, used in the subjects of its certificates.")
    var name: String = "Mutual Internal CA"

    @Option(help: "Key type of the CA keys: \(KeyChoice.choices). An ML-DSA type also makes the classical (P-256) hierarchy the authority's own listener needs, and an ML-DSA one beside it that issues every ML-DSA key (see docs/post-quantum.md).")
    var keyType: KeyChoice = .classical(.p256)

    @Option(name: .customLong("permit-dns"), help: "Name constraint: DNS suffix the issuing CA may certify (repeatable).")
    var permitDNS: [String] = []

    @Option(name: .customLong("permit-uri"), help: "Name constraint: URI prefix the issuing CA may certify, e.g. spiffe://example.org/ns/prod (repeatable).")
    var permitURI: [String] = []

    @Option(help: "Longest leaf validity the CA will sign.", transform: ValidityDuration.argument)
    var maxValidity: ValidityDuration = .days(90)

    @Flag(help: "Encrypt the CA keys with a passphrase (from MUTUAL_PASSPHRASE or a prompt).")
    var encryptKeys = false

    @Option(help: "Keep the issuing CA key in a PKCS#11 token instead of a file: an RFC 7512 URI, e.g. 'pkcs11:token=mutual;object=issuing?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/mutual/pin'. The key named by object/id is used if the token has it, else generated there (sensitive, not extractable). The PIN comes from pin-source, pin-value or MUTUAL_PKCS11_PIN.")
    var keyStore: String?

    @Option(help: "PKCS#11 URI of the root key (default with --key-store: the same token, object=<object>-root).")
    var rootKeyStore: String?

    @Option(help: "Base URL other hosts use to fetch the CRL (URL/crl) and ask OCSP (URL/ocsp), http://HOST[:PORT]; placed in every certificate, by the CLI and by `serve` alike (change it later with `mutual config`).")
    var httpPublicURL: String?

    @Flag(help: "Print the result as JSON.")
    var json = false

    func run() async throws {
        let state = stateOptions.state
        if let httpPublicURL { _ = try await failing { try Authority.validatedHTTPPublicURL(httpPublicURL) } }
        var passphrase: String?
        if let env = ProcessInfo.processInfo.environment["MUTUAL_PASSPHRASE"], !env.isEmpty {
            passphrase = env
        } else if encryptKeys {
            guard let entered = Passphrase.read(), !entered.isEmpty else {
                throw CommandFailure("--encrypt-keys needs a passphrase: set MUTUAL_PASSPHRASE or run on a terminal", exitCode: 2)
            }
            passphrase = entered
        }
        let classicalKeyType: KeyType
        switch keyType {
        case .classical(let k): classicalKeyType = k
        case .mldsa: classicalKeyType = .p256
        }
        if rootKeyStore != nil && keyStore == nil {
            throw CommandFailure("--root-key-store needs --key-store (the issuing key's token)", exitCode: 2, code: "pkcs11-bad-uri")
        }
        if keyStore != nil && encryptKeys {
            throw CommandFailure("--encrypt-keys applies to key files; keys in a PKCS#11 token are protected by the token's PIN", exitCode: 2)
        }
        let keyStoreURI = try await failing { try keyStore.map { try PKCS11URI($0) } }
        let rootKeyStoreURI = try await failing { try rootKeyStore.map { try PKCS11URI($0) } }
        if keyStoreURI != nil { passphrase = nil }
        let result = try await failing {
            try await Authority.initialize(
                state: state, name: name, keyType: classicalKeyType,
                constraints: .init(permittedDNS: permitDNS, permittedURIPrefixes: permitURI),
                passphrase: passphrase, policy: IssuancePolicy(maximumValidity: maxValidity), actor: cliActor,
                databaseURL: stateOptions.databaseURL, keyStore: keyStoreURI, rootKeyStore: rootKeyStoreURI
            )
        }
        if let httpPublicURL {
            try await failing {
                let authority = try await Authority.open(state: state, passphrase: { passphrase }, databaseURL: stateOptions.databaseURL)
                defer { Task { try? await authority.close() } }
                try await authority.setHTTPPublicURL(httpPublicURL, explicit: true, actor: cliActor)
            }
        }
        var pq: MLDSAHierarchy?
        if case .mldsa(let variant) = keyType {
            pq = try await failing {
                let authority = try await Authority.open(state: state, passphrase: { passphrase }, databaseURL: stateOptions.databaseURL)
                do {
                    let made = try await authority.addPQHierarchy(variant: variant, passphrase: passphrase, actor: cliActor)
                    try await authority.close()
                    return made
                } catch {
                    try? await authority.close()
                    throw error
                }
            }
        }
        if json {
            var object = [
                "state_dir": state.path, "root": state.rootCertificatePath, "intermediate": state.intermediateCertificatePath,
                "root_fingerprint": result.rootFingerprint, "admin_cert": state.adminDirectory + "/cert.pem",
            ]
            if let keyStoreURI {
                object["key_store"] = keyStoreURI.description
                object["root_key_store"] = (rootKeyStoreURI ?? keyStoreURI.naming(object: (keyStoreURI.object ?? "mutual") + "-root")).description
            }
            if let httpPublicURL { object["http_public_url"] = try Authority.validatedHTTPPublicURL(httpPublicURL) }
            if let pq {
                object["pq_root"] = state.pqRootCertificatePath
                object["pq_intermediate"] = state.pqIntermediateCertificatePath
                object["pq_root_fingerprint"] = pq.root.fingerprint
                object["pq_key_type"] = pq.root.subjectKeyVariant?.rawValue
            }
            try printJSON(object)
            return
        }
        print("Created CA \"\(name)\" in \(state.path)")
        print("  root:          \(state.rootCertificatePath)  (\(classicalKeyType.rawValue), valid until \(result.root.notValidAfter))")
        print("  issuing CA:    \(state.intermediateCertificatePath)  (path length 0\(permitDNS.isEmpty && permitURI.isEmpty ? "" : ", name constraints"))")
        if let keyStoreURI {
            let rootURI = rootKeyStoreURI ?? keyStoreURI.naming(object: (keyStoreURI.object ?? "mutual") + "-root")
            print("  issuing key:   \(keyStoreURI)  (PKCS#11 token; never leaves it)")
            print("  root key:      \(rootURI)")
        } else {
            print("  keys:          \(state.caDirectory)/*.key  (mode 0600\(passphrase != nil ? ", encrypted" : ""))")
        }
        print("  admin client:  \(state.adminDirectory)/cert.pem")
        print("  root SHA-256:  \(result.rootFingerprint)")
        if let pq { printPQHierarchy(pq, state: state) }
        if let httpPublicURL {
            print("  CRL and OCSP:  \(try Authority.validatedHTTPPublicURL(httpPublicURL))/crl, /ocsp  (in every certificate)")
        } else {
            print("  CRL and OCSP:  not set yet: `mutual serve` records its --http-public-url (or listener); set it now with `mutual config --http-public-url http://NAME:9080`")
        }
        print("Take the root key offline once you no longer need to re-issue the intermediate: see docs/operations.md.")
    }
}

struct RootCRLCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "root-crl",
        abstract: "Re-sign the root's CRL (ca/root-crl.pem) with the next number; needs the root key.",
        discussion: "The root CRL is valid for a year. Run this where the root key is (bring it back from offline storage), then publish the file; `mutual serve` serves it in /crls.pem."
    )

    @OptionGroup var stateOptions: StateOptions

    @Flag(help: "Print the result as JSON.")
    var json = false

    func run() async throws {
        let state = stateOptions.state
        let result = try await failing { try Authority.refreshRootCRL(
                state: state, passphrase: Passphrase.read, rootKeyStore: (try? Authority.loadConfiguration(state))?.rootKeyStore
            ) }
        if json {
            try printJSON(["path": state.rootCRLPath, "number": String(result.number), "next_update": AuditChain.format(result.nextUpdate)])
            return
        }
        print("Signed root CRL #\(result.number) in \(state.rootCRLPath), valid until \(result.nextUpdate)")
    }
}

struct ConfigCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "config",
        abstract: "Show or change the CA's settings kept in its inventory (shared by the CLI and every `serve`).",
        discussion: """
            --http-public-url sets the base URL placed in certificates issued from now on: CRL distribution point
            URL/crl and OCSP URL/ocsp. Certificates already issued keep the URLs they carry.
            """
    )

    @OptionGroup var stateOptions: StateOptions

    @Option(help: "Base URL for CRL and OCSP in new certificates, http://HOST[:PORT][/PATH].")
    var httpPublicURL: String?

    @Flag(help: "Print the result as JSON.")
    var json = false

    func run() async throws {
        let authority = try await stateOptions.openAuthority()
        defer { Task { try? await authority.close() } }
        if let httpPublicURL {
            try await failing { try await authority.setHTTPPublicURL(httpPublicURL, explicit: true, actor: cliActor) }
        }
        let current = try await failing { try await authority.httpPublicURL() }
        if json {
            var object: [String: String] = [:]
            if let current {
                object["http_public_url"] = current.url
                object["http_public_url_source"] = current.explicit ? "set" : "serve-listener"
            }
            try printJSON(object)
            return
        }
        if let current {
            print("http-public-url: \(current.url)  (\(current.explicit ? "set" : "from serve's --http-listen"); CRL \(current.url)/crl, OCSP \(current.url)/ocsp)")
            if let host = URL(string: current.url)?.host, Authority.isLoopbackHost(host) {
                print("warning: \(host) is reachable from this host only; other hosts cannot check revocation")
            }
        } else {
            print("http-public-url: not set: certificates carry no CRL or OCSP URL until `mutual serve` runs or this is set")
        }
    }
}
