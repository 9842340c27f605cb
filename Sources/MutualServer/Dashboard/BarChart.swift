import Foundation

/// A bar chart drawn by the server as SVG: no script, no library, nothing fetched. Each bar carries a `<title>` (the
/// browser's tooltip) and the whole chart an accessible label summarising it.
struct BarChart {
    var values: [Int]
    /// Label of bar `i` in tooltips ("day 3: 12 certificates").
    var label: (Int) -> String
    /// CSS class of bar `i` (colours by urgency).
    var barClass: (Int) -> String = { _ in "bar" }
    var summary: String
    /// Axis ticks: bar index → text.
    var ticks: [Int: String] = [:]

    func svg(width: Int = 900, height: Int = 180) -> String {
        let left = 40.0, bottom = 22.0, top = 8.0
        let plotWidth = Double(width) - left - 8
        let plotHeight = Double(height) - bottom - top
        let maximum = max(1, values.max() ?? 1)
        // A round top for the axis: 1, 2, 5 × 10^n.
        let scale = Self.niceCeiling(maximum)
        let step = plotWidth / Double(max(1, values.count))
        var svg = "<svg class=\"chart\" viewBox=\"0 0 \(width) \(height)\" role=\"img\" aria-label=\"\(HTML.escape(summary))\" xmlns=\"http://www.w3.org/2000/svg\">"
        svg += "<line x1=\"\(left)\" y1=\"\(top + plotHeight)\" x2=\"\(Double(width) - 8)\" y2=\"\(top + plotHeight)\" stroke=\"#d0d7de\"/>"
        svg += "<text x=\"\(left - 4)\" y=\"\(top + 10)\" text-anchor=\"end\">\(scale)</text>"
        svg += "<text x=\"\(left - 4)\" y=\"\(top + plotHeight)\" text-anchor=\"end\">0</text>"
        for (index, value) in values.enumerated() where value > 0 {
            let h = max(1, plotHeight * Double(value) / Double(scale))
            let x = left + Double(index) * step + step * 0.1
            svg += "<rect class=\"\(HTML.escape(barClass(index)))\" x=\(Self.quoted(x)) y=\(Self.quoted(top + plotHeight - h)) width=\(Self.quoted(step * 0.8)) height=\(Self.quoted(h))>"
            svg += "<title>\(HTML.escape(label(index))): \(value)</title></rect>"
        }
        for (index, text) in ticks.sorted(by: { $0.key < $1.key }) {
            let x = left + Double(index) * step + step / 2
            svg += "<text x=\(Self.quoted(x)) y=\"\(height - 6)\" text-anchor=\"middle\">\(HTML.escape(text))</text>"
        }
        return svg + "</svg>"
    }

    static func quoted(_ value: Double) -> String { "\"\(String(format: "%.1f", value))\"" }

    static func niceCeiling(_ value: Int) -> Int {
        var magnitude = 1
        while magnitude * 10 <= value { magnitude *= 10 }
        for factor in [1, 2, 5, 10] where factor * magnitude >= value { return factor * magnitude }
        return value
    }
}
