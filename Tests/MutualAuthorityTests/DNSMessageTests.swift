import Foundation
@testable import MutualAuthority
import Testing

@Suite("DNS messages for dns-01 (in memory): the query, TXT answers, CNAMEs, and hostile or broken responses")
struct DNSMessageTests {
    /// A response to `query` with the given answer records (owner name bytes, type, rdata).
    static func response(_ query: [UInt8], rcode: UInt8 = 0, truncated: Bool = false, answers: [([UInt8], UInt16, [UInt8])]) -> [UInt8] {
        var bytes = Array(query.prefix(2)) + [0x81 | (truncated ? 0x02 : 0), 0x80 | rcode, 0, 1, 0, UInt8(answers.count), 0, 0, 0, 0]
        bytes += query[12...]
        for (owner, type, data) in answers {
            bytes += owner + [UInt8(type >> 8), UInt8(type & 0xFF), 0, 1, 0, 0, 0, 60, UInt8(data.count >> 8), UInt8(data.count & 0xFF)] + data
        }
        return bytes
    }

    static func txt(_ strings: [String]) -> [UInt8] { strings.flatMap { [UInt8($0.utf8.count)] + Array($0.utf8) } }
    static let pointerToQuestion: [UInt8] = [0xC0, 12]

    @Test("a TXT answer through a compression pointer; several strings of one record are joined; other owners are ignored")
    func txtAnswers() throws {
        let name = "_acme-challenge.example.org"
        let query = try DNSMessage.query(id: 0x1234, name: name)
        #expect(query.count == 12 + name.utf8.count + 2 + 4)
        let other = try DNSMessage.encodeName("other.example.org")
        let reply = Self.response(query, answers: [
            (Self.pointerToQuestion, DNSMessage.typeTXT, Self.txt(["abc", "def"])),
            (Self.pointerToQuestion, DNSMessage.typeTXT, Self.txt(["second"])),
            (other, DNSMessage.typeTXT, Self.txt(["not ours"])),
        ])
        let answer = try DNSMessage.parse(reply, expectedID: 0x1234, name: name)
        #expect(answer.txt == ["abcdef", "second"])
        #expect(answer.rcode == 0 && !answer.truncated)
    }

    @Test("a CNAME is followed to its target's TXT records; NXDOMAIN and truncation are reported")
    func cnameAndCodes() throws {
        let name = "_acme-challenge.example.org"
        let query = try DNSMessage.query(id: 7, name: name)
        let target = try DNSMessage.encodeName("delegated.acme.example.net")
        let reply = Self.response(query, answers: [
            (Self.pointerToQuestion, DNSMessage.typeCNAME, target),
            (target, DNSMessage.typeTXT, Self.txt(["via-cname"])),
        ])
        #expect(try DNSMessage.parse(reply, expectedID: 7, name: name).txt == ["via-cname"])
        #expect(try DNSMessage.parse(Self.response(query, rcode: 3, answers: []), expectedID: 7, name: name).rcode == 3)
        #expect(try DNSMessage.parse(Self.response(query, truncated: true, answers: []), expectedID: 7, name: name).truncated)
    }

    @Test("hostile and broken responses are refused, never looped on: another id, a query, truncation at every byte, forward and self pointers, records past the end, random bytes")
    func hostile() throws {
        let name = "_acme-challenge.example.org"
        let query = try DNSMessage.query(id: 9, name: name)
        let good = Self.response(query, answers: [(Self.pointerToQuestion, DNSMessage.typeTXT, Self.txt(["value"]))])
        #expect(throws: DNSMessage.ParseError.self) { try DNSMessage.parse(good, expectedID: 10, name: name) }
        #expect(throws: DNSMessage.ParseError.self) { try DNSMessage.parse(query, expectedID: 9, name: name) }
        for length in 0..<good.count {
            #expect(throws: DNSMessage.ParseError.self, "truncated at \(length)") { try DNSMessage.parse(Array(good.prefix(length)), expectedID: 9, name: name) }
        }
        let selfPointer = Self.response(query, answers: [([0xC0, UInt8(12 + query.count - 12)], DNSMessage.typeTXT, Self.txt(["x"]))])
        #expect(throws: DNSMessage.ParseError.self) { try DNSMessage.parse(selfPointer, expectedID: 9, name: name) }
        var forward = good
        forward[12 + name.utf8.count + 2 + 4] = 0xC0
        forward[12 + name.utf8.count + 2 + 5] = 0xFF
        #expect(throws: DNSMessage.ParseError.self) { try DNSMessage.parse(forward, expectedID: 9, name: name) }
        let overlong = Self.response(query, answers: [(Self.pointerToQuestion, DNSMessage.typeTXT, [200, 1, 2])])
        #expect(throws: DNSMessage.ParseError.self) { try DNSMessage.parse(overlong, expectedID: 9, name: name) }
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<2000 {
            let random = (0..<Int.random(in: 0..<80, using: &generator)).map { _ in UInt8.random(in: 0...255, using: &generator) }
            _ = try? DNSMessage.parse(random, expectedID: 9, name: name)  // must return or throw, never trap or hang
        }
        #expect(throws: DNSMessage.ParseError.self) { try DNSMessage.query(id: 1, name: String(repeating: "a", count: 64) + ".org") }
    }
}
