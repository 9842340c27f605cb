import Foundation

/// Server-rendered HTML for the dashboard. Hand-written because no listed package renders HTML; it is a few string
/// helpers. Every value that comes from a certificate, the inventory, a token or a request goes through ``escape(_:)``
/// (text and attribute values alike), so a SAN of `<script>` or `"onmouseover=` renders as text.
enum HTML {
    static func escape(_ text: String) -> String {
        var out = ""
        out.reserveCapacity(text.utf8.count)
        for scalar in text.unicodeScalars {
            switch scalar {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            case "'": out += "&#39;"
            case "\u{0}"..."\u{8}", "\u{B}", "\u{C}", "\u{E}"..."\u{1F}", "\u{7F}": out += "\u{FFFD}"
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out
    }

    /// A query-string component, percent-encoded (then escaped when put in an attribute).
    static func query(_ text: String) -> String {
        var allowed = CharacterSet.alphanumerics
        allowed.insert(charactersIn: "-._~")
        return text.addingPercentEncoding(withAllowedCharacters: allowed) ?? ""
    }

    /// `?a=b&c=d` from the non-empty pairs, escaped for an attribute.
    static func link(_ path: String, _ pairs: [(String, String?)]) -> String {
        let items = pairs.compactMap { key, value in value.flatMap { $0.isEmpty ? nil : "\(key)=\(query($0))" } }
        return escape(items.isEmpty ? path : path + "?" + items.joined(separator: "&"))
    }

    static func date(_ date: Date) -> String {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withFullDate, .withTime, .withColonSeparatorInTime, .withDashSeparatorInDate, .withSpaceBetweenDateAndTime]
        formatter.timeZone = TimeZone(identifier: "UTC")
        return formatter.string(from: date) + " UTC"
    }

    /// "in 3 d", "5 h ago".
    static func relative(_ date: Date, now: Date) -> String {
        let seconds = date.timeIntervalSince(now)
        let magnitude = abs(seconds)
        let text: String
        switch magnitude {
        case ..<120: text = "\(Int(magnitude)) s"
        case ..<7200: text = "\(Int(magnitude / 60)) min"
        case ..<(2 * 86_400): text = "\(Int(magnitude / 3600)) h"
        default: text = "\(Int(magnitude / 86_400)) d"
        }
        return seconds >= 0 ? "in \(text)" : "\(text) ago"
    }

    /// A table with a caption and column headers; `rows` are already-rendered cells.
    static func table(caption: String, headers: [String], rows: [[String]], empty: String = "Nothing to show.") -> String {
        guard !rows.isEmpty else { return "<p class=\"empty\">\(escape(empty))</p>" }
        var html = "<table><caption>\(escape(caption))</caption><thead><tr>"
        for header in headers { html += "<th scope=\"col\">\(escape(header))</th>" }
        html += "</tr></thead><tbody>"
        for row in rows {
            html += "<tr>" + row.map { "<td>\($0)</td>" }.joined() + "</tr>"
        }
        return html + "</tbody></table>"
    }

    static func status(_ status: String) -> String {
        "<span class=\"status status-\(escape(status))\">\(escape(status))</span>"
    }
}

/// The stylesheet, served from the dashboard itself (no assets from elsewhere; the CSP allows only 'self').
enum DashboardStyle {
    static let css = """
        :root { color-scheme: light; --fg: #1b1f24; --muted: #57606a; --line: #d0d7de; --accent: #0a58ca; --bad: #b42318; --warn: #9a6700; --ok: #1a7f37; }
        * { box-sizing: border-box; }
        body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); background: #f6f8fa; }
        header { background: #0d1117; color: #fff; padding: .6rem 1.2rem; display: flex; gap: 1.5rem; align-items: center; flex-wrap: wrap; }
        header a { color: #c9d1d9; text-decoration: none; }
        header a[aria-current="page"] { color: #fff; font-weight: 600; border-bottom: 2px solid #58a6ff; }
        header .brand { font-weight: 700; color: #fff; }
        header form { margin-left: auto; }
        header .who { color: #8b949e; font-size: .9em; }
        main { padding: 1.2rem; max-width: 1200px; margin: 0 auto; }
        h1 { font-size: 1.4rem; margin: .2rem 0 1rem; }
        h2 { font-size: 1.1rem; margin: 1.4rem 0 .5rem; }
        .cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: .8rem; }
        .card { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: .7rem .9rem; }
        .card .n { font-size: 1.7rem; font-weight: 700; display: block; }
        .card a { color: inherit; text-decoration: none; }
        .grid2 { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 1rem; }
        table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid var(--line); }
        caption { text-align: left; font-weight: 600; padding: .4rem 0; }
        th, td { text-align: left; padding: .35rem .6rem; border-bottom: 1px solid var(--line); vertical-align: top; overflow-wrap: anywhere; }
        th { background: #f0f3f6; font-weight: 600; }
        td.num, th.num { text-align: right; }
        a { color: var(--accent); }
        .status { font-size: .8em; padding: .05rem .45rem; border-radius: 1rem; border: 1px solid currentColor; white-space: nowrap; }
        .status-valid { color: var(--ok); } .status-revoked, .status-expired, .status-broken { color: var(--bad); }
        .status-superseded { color: var(--muted); } .status-intact { color: var(--ok); }
        .banner { padding: .6rem .9rem; border-radius: 6px; margin-bottom: 1rem; border: 1px solid; }
        .banner.ok { background: #dafbe1; border-color: #4ac26b; } .banner.bad { background: #ffebe9; border-color: #ff8182; }
        .banner.warn { background: #fff8c5; border-color: #d4a72c; }
        form.filters { display: flex; flex-wrap: wrap; gap: .6rem; align-items: end; margin-bottom: 1rem; }
        form.filters label, form.action label { display: flex; flex-direction: column; font-size: .85em; color: var(--muted); }
        input, select, button { font: inherit; padding: .3rem .5rem; border: 1px solid var(--line); border-radius: 4px; }
        button { background: var(--accent); color: #fff; border-color: var(--accent); cursor: pointer; }
        button.danger { background: var(--bad); border-color: var(--bad); }
        header button { background: transparent; color: #c9d1d9; border-color: #30363d; }
        .pager { display: flex; gap: 1rem; margin: .8rem 0; }
        dl.fields { display: grid; grid-template-columns: max-content 1fr; gap: .3rem 1rem; background: #fff; border: 1px solid var(--line); padding: .8rem; }
        dl.fields dt { font-weight: 600; } dl.fields dd { margin: 0; overflow-wrap: anywhere; }
        pre { background: #fff; border: 1px solid var(--line); padding: .6rem; overflow-x: auto; font-size: .85em; }
        svg.chart { width: 100%; height: auto; background: #fff; border: 1px solid var(--line); }
        svg.chart .bar { fill: #0a58ca; } svg.chart .bar.soon { fill: #b42318; } svg.chart .bar.month { fill: #9a6700; }
        svg.chart text { font-size: 11px; fill: #57606a; }
        .empty { color: var(--muted); }
        .muted { color: var(--muted); }
        .code { font-family: ui-monospace, monospace; font-size: .9em; }
        """
}
