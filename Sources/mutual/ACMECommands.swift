import ArgumentParser
import Foundation
import MutualAuthority
import MutualStore

/// `mutual acme`: what the ACME provisioners of `mutual serve --acme` hold — accounts, their orders, and External
/// Account Binding keys.
struct ACMECommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "acme", abstract: "ACME accounts, orders and External Account Binding keys.",
        subcommands: [Accounts.self, Orders.self, EAB.self]
    )

    struct AccountView: Encodable {
        var id: String
        var provisioner: String
        var status: String
        var owner: String
        var contact: [String]
        var thumbprint: String
        var created_at: Date
    }

    struct OrderView: Encodable {
        var id: String
        var account: String
        var provisioner: String
        var status: String
        var identifiers: [String]
        var expires: Date
        var created_at: Date
        var certificate_serial: String?
        var replaces: String?
        var error: String?
    }

    struct Accounts: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List ACME accounts: provisioner, status, owner (the owner of their certificates).")
        @OptionGroup var stateOptions: StateOptions
        @Flag(help: "Print JSON.") var json = false

        func run() async throws {
            let authority = try await stateOptions.openAuthority()
            let rows = try await failing { try await authority.store.acmeAccounts() }
            try? await authority.close()
            let accounts = try rows.map { row -> AccountView in
                let account = try ACMEService.decode(ACMEAccount.self, row.body)
                return AccountView(id: account.id, provisioner: account.provisioner, status: row.status, owner: account.owner,
                                   contact: account.contact, thumbprint: account.thumbprint, created_at: account.createdAt)
            }
            if json { return try printJSON(accounts) }
            var table = [["ID", "PROVISIONER", "STATUS", "OWNER", "CONTACT", "CREATED"]]
            for a in accounts { table.append([a.id, a.provisioner, a.status, a.owner, a.contact.joined(separator: " "), AuditTime.short(a.created_at)]) }
            printTable(table)
        }
    }

    struct Orders: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List ACME orders, oldest first, with their status, names and certificate.")
        @OptionGroup var stateOptions: StateOptions
        @Option(help: "Only this account's orders (its id, as `mutual acme accounts` prints).") var account: String?
        @Option(help: "At most this many orders.") var limit: Int = 1000
        @Flag(help: "Print JSON.") var json = false

        func run() async throws {
            guard (1...100_000).contains(limit) else { throw CommandFailure("--limit must be between 1 and 100000", exitCode: 2) }
            let authority = try await stateOptions.openAuthority()
            let rows = try await failing { try await authority.store.acmeOrders(account: account, limit: limit) }
            try? await authority.close()
            let orders = try rows.map { row -> OrderView in
                let order = try ACMEService.decode(ACMEOrder.self, row.body)
                return OrderView(
                    id: order.id, account: order.accountID, provisioner: order.provisioner, status: row.status,
                    identifiers: order.identifiers.map { "\($0.type):\($0.value)" }, expires: order.expires, created_at: order.createdAt,
                    certificate_serial: order.certificateSerial, replaces: order.replaces, error: order.error.map { "\($0.type): \($0.detail)" }
                )
            }
            if json { return try printJSON(orders) }
            var table = [["ID", "ACCOUNT", "STATUS", "IDENTIFIERS", "CERTIFICATE", "CREATED"]]
            for o in orders { table.append([o.id, o.account, o.status, o.identifiers.joined(separator: " "), o.certificate_serial ?? "-", AuditTime.short(o.created_at)]) }
            printTable(table)
        }
    }

    struct EAB: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "eab", abstract: "External Account Binding keys: one per team, each binds one ACME account.",
            subcommands: [Create.self, List.self]
        )

        struct Create: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Make a key for a provisioner and a team. The HMAC key is shown once; give both to the team's ACME client (certbot --eab-kid KID --eab-hmac-key KEY)."
            )
            @OptionGroup var stateOptions: StateOptions
            @Option(help: "The ACME provisioner (the NAME of `mutual serve --acme NAME`).") var provisioner: String
            @Option(help: "The team: owner of the account and of every certificate it gets.") var owner: String
            @Flag(help: "Print JSON.") var json = false

            func run() async throws {
                let authority = try await stateOptions.openAuthority()
                do {
                    let key = try await failing { try await ACMEService.createEABKey(store: authority.store, provisioner: provisioner, owner: owner, actor: cliActor) }
                    try? await authority.close()
                    if json {
                        try printJSON(["kid": key.kid, "hmac_key": key.hmacKey, "provisioner": key.provisioner, "owner": key.owner])
                    } else {
                        print("kid:      \(key.kid)\nhmac key: \(key.hmacKey)")
                        FileHandle.standardError.write(Data("EAB key for provisioner \(provisioner), owner \(owner). The HMAC key is shown once.\n".utf8))
                    }
                } catch {
                    try? await authority.close()
                    throw error
                }
            }
        }

        struct List: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "List EAB keys (never the HMAC key) and the account each bound.")
            @OptionGroup var stateOptions: StateOptions
            @Flag(help: "Print JSON.") var json = false

            struct View: Encodable {
                var kid: String
                var provisioner: String
                var owner: String
                var account: String?
                var created_at: Date
            }

            func run() async throws {
                let authority = try await stateOptions.openAuthority()
                let keys = try await failing { try await authority.store.acmeEABKeys() }
                try? await authority.close()
                let views = keys.map { View(kid: $0.kid, provisioner: $0.provisioner, owner: $0.owner, account: $0.accountID, created_at: $0.createdAt) }
                if json { return try printJSON(views) }
                var table = [["KID", "PROVISIONER", "OWNER", "ACCOUNT", "CREATED"]]
                for v in views { table.append([v.kid, v.provisioner, v.owner, v.account ?? "unused", AuditTime.short(v.created_at)]) }
                printTable(table)
            }
        }
    }
}
