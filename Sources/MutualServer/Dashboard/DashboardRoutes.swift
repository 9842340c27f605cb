import Foundation
import HTTPTypes
import Hummingbird
import NIOCore

/// Puts the dashboard on the authority's HTTPS listener under `/dashboard/`: adapts Hummingbird requests to
/// ``DashboardService`` and its responses back.
struct DashboardRoutes: Sendable {
    let service: DashboardService

    func register(on router: Router<APIContext>) {
        for path in ["/dashboard", "/dashboard/**"] {
            router.get(RouterPath(stringLiteral: path)) { request, context in try await self.serve(request, context) }
            router.post(RouterPath(stringLiteral: path)) { request, context in try await self.serve(request, context) }
        }
    }

    func serve(_ request: Request, _ context: APIContext) async throws -> Response {
        if request.uri.path == "/dashboard" {
            // Relative links on the pages assume the trailing slash.
            return Response(status: .seeOther, headers: [.location: "/dashboard/"])
        }
        var headers: [String: String] = [:]
        for field in request.headers {
            let name = field.name.canonicalName
            // Cookies sent in several fields are joined as one header would carry them.
            headers[name] = headers[name].map { $0 + (name == "cookie" ? "; " : ", ") + field.value } ?? field.value
        }
        if headers["host"] == nil, let authority = request.head.authority { headers["host"] = authority }
        var body: [UInt8] = []
        if request.method == .post {
            do {
                body = Array(buffer: try await request.body.collect(upTo: DashboardService.maximumFormBytes))
            } catch {
                body = Array(repeating: 0, count: DashboardService.maximumFormBytes + 1)
            }
        }
        let query = DashboardService.urlEncoded(request.uri.query ?? "") ?? [:]
        let dashboardRequest = DashboardRequest(
            method: request.method.rawValue, path: request.uri.path, query: query, headers: headers, body: body,
            peerCertificate: try? await context.peerCertificate()
        )
        let answer = await service.handle(dashboardRequest)
        var fields = HTTPFields()
        for (name, value) in answer.headers {
            if let field = HTTPField.Name(name) { fields.append(HTTPField(name: field, value: value)) }
        }
        return Response(status: .init(code: answer.status), headers: fields, body: .init(byteBuffer: ByteBuffer(bytes: answer.body)))
    }
}
