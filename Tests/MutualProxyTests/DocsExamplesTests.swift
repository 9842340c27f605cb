import Foundation
import MutualPKI
import MutualProxy
import Testing

/// Every proxy configuration shown in the documentation is parsed and validated by the proxy's own loader, so an
/// example that would be refused (a renamed key, a bad address, a policy the proxy rejects) fails the build instead of
/// the reader. The shell examples are run by scripts/docs-examples.sh.
@Suite("Documentation examples: YAML configurations")
struct DocsExamplesTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// The ```yaml blocks of a Markdown file, with the line each starts on.
    static func yamlBlocks(in path: String) throws -> [(line: Int, text: String)] {
        let lines = try String(contentsOf: root.appendingPathComponent(path), encoding: .utf8).components(separatedBy: "\n")
        var blocks: [(Int, String)] = []
        var current: [String]?
        var start = 0
        for (index, line) in lines.enumerated() {
            let trimmed = line.trimmingCharacters(in: .whitespaces)
            if current == nil, trimmed == "```yaml" {
                current = []
                start = index + 1
            } else if current != nil, trimmed == "```" {
                blocks.append((start, current!.joined(separator: "\n")))
                current = nil
            } else if current != nil {
                current!.append(line)
            }
        }
        return blocks
    }

    /// Placeholders a reader replaces (`dea53190…`, `mtk_…`) become values of the right shape.
    static func fillPlaceholders(_ text: String) -> String {
        text.replacingOccurrences(of: "dea53190…", with: String(repeating: "de", count: 32))
            .replacingOccurrences(of: "mtk_…", with: "mtk_0123456789abcdef_secret")
    }

    @Test("every YAML example in README.md and docs/ is a configuration the proxy accepts")
    func yamlExamples() throws {
        let files = ["README.md"] + (try FileManager.default.contentsOfDirectory(atPath: Self.root.appendingPathComponent("docs").path))
            // docs/acme.md shows the authority's file, checked by AuthorityFileTests.
            .filter { $0.hasSuffix(".md") && $0 != "acme.md" }.sorted().map { "docs/" + $0 }
        var checked = 0
        for file in files {
            for block in try Self.yamlBlocks(in: file) {
                do {
                    _ = try ProxyConfiguration.parse(yaml: Self.fillPlaceholders(block.text))
                    checked += 1
                } catch let error as PKIError {
                    Issue.record("\(file):\(block.line): the proxy refuses this example: \(error.reason)")
                }
            }
        }
        #expect(checked >= 4, "found only \(checked) YAML examples")
    }
}
