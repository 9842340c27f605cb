import Foundation
import X509

/// A bounded search for candidate certificate paths, run in front of swift-certificates' `Verifier`.
///
/// Hand-written because the `Verifier`'s path builder explores every path through the intermediates it is given:
/// depth is only known when a root is reached, there is no work budget, and it cannot be cancelled. A peer that sends
/// a lattice of intermediates sharing one key (several per subject, several subjects; no valid certificate needed)
/// makes it verify signatures along every permutation: seconds of CPU per handshake. This search walks the same
/// graph by names alone (no signature is checked here; the `Verifier` checks them on the paths handed to it) but:
///
/// - never extends a path beyond `maxDepth` intermediates (self-issued ones not counted, as RFC 5280 6.1.4 (l));
/// - expands at most ``Budget/maximumExpansions`` partial paths;
/// - hands at most ``Budget/maximumCandidates`` paths on, issuers whose subject key identifier matches the child's
///   authority key identifier first (the `Verifier`'s own preference);
/// - stops when its task is cancelled (the connection that asked went away).
///
/// Each path it finds ends at a certificate whose issuer names a root; the caller hands exactly that path's
/// intermediates to the `Verifier`, which then does the RFC 5280 work (signatures included) on one linear chain.
///
/// Cost: name comparisons only, at most `maximumExpansions` of them per issuer list; the signature work that follows
/// is at most `maximumCandidates × (maxDepth + 2)` verifications, and for an ordinary chain exactly the ones the
/// `Verifier` would do anyway.
struct PathSearch {
    struct Budget: Sendable, Equatable {
        /// Partial paths taken off the stack and expanded, per search.
        var maximumExpansions = 256
        /// Candidate paths handed to the verifier, per search; the first that validates wins.
        var maximumCandidates = 8
    }

    enum Result: Equatable {
        /// Paths (intermediates only, leaf-side first) whose last certificate's issuer names a root. The empty path
        /// means the leaf's issuer is a root.
        case candidates([[Certificate]])
        /// The search ran out of budget before it was done: the peer's chain is too complex to consider.
        case exhausted(String)
        /// The task was cancelled.
        case cancelled
    }

    let roots: [Certificate]
    let intermediates: [Certificate]
    let maxDepth: Int
    let budget: Budget

    /// Work done by the last `run`: tests assert the bound on it.
    private(set) var expansions = 0
    /// True when an issuer was left out because the path would exceed `maxDepth`.
    private(set) var prunedByDepth = false

    init(roots: [Certificate], intermediates: [Certificate], maxDepth: Int, budget: Budget = Budget()) {
        self.roots = roots
        self.intermediates = intermediates
        self.maxDepth = maxDepth
        self.budget = budget
    }

    private struct Partial {
        var path: [Int]
        var tip: Certificate
        var counted: Int
    }

    mutating func run(leaf: Certificate) -> Result {
        expansions = 0
        prunedByDepth = false
        let rootSubjects = Set(roots.map(\.subject))
        var bySubject: [DistinguishedName: [Int]] = [:]
        for (index, certificate) in intermediates.enumerated() { bySubject[certificate.subject, default: []].append(index) }
        var found: [[Certificate]] = []
        var stack = [Partial(path: [], tip: leaf, counted: 0)]
        let pathLimit = maxDepth * 2 + 2  // self-issued certificates are not counted, but paths stay finite
        while let partial = stack.popLast() {
            if Task.isCancelled { return .cancelled }
            if expansions >= budget.maximumExpansions {
                return .exhausted("path building stopped after \(budget.maximumExpansions) partial paths (the chain sent is too complex)")
            }
            expansions += 1
            if rootSubjects.contains(partial.tip.issuer) {
                found.append(partial.path.map { intermediates[$0] })
                if found.count >= budget.maximumCandidates { break }
            }
            guard partial.path.count < pathLimit, let parents = bySubject[partial.tip.issuer] else { continue }
            let authorityKey = (try? partial.tip.extensions.authorityKeyIdentifier)?.keyIdentifier
            var preferred: [Partial] = []
            var others: [Partial] = []
            for parent in parents where !Self.inPath(intermediates[parent], partial, intermediates, leaf) {
                let candidate = intermediates[parent]
                let counted = partial.counted + (candidate.subject == candidate.issuer ? 0 : 1)
                if counted > maxDepth {
                    prunedByDepth = true
                    continue
                }
                let next = Partial(path: partial.path + [parent], tip: candidate, counted: counted)
                let subjectKey = (try? candidate.extensions.subjectKeyIdentifier)?.keyIdentifier
                if let authorityKey, let subjectKey, authorityKey != subjectKey {
                    others.append(next)
                } else {
                    preferred.append(next)
                }
            }
            // Depth-first; matching key identifiers first, then in the order the peer sent them.
            stack.append(contentsOf: (preferred + others).reversed())
        }
        return .candidates(found)
    }

    /// Loop detection as RFC 4158 5.2 and the Verifier do it: the same subject and key once per path.
    private static func inPath(_ certificate: Certificate, _ partial: Partial, _ all: [Certificate], _ leaf: Certificate) -> Bool {
        func same(_ a: Certificate, _ b: Certificate) -> Bool { a.subject == b.subject && a.publicKey == b.publicKey }
        return same(certificate, leaf) || partial.path.contains { same(all[$0], certificate) }
    }
}
