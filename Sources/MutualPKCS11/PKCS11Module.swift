import CPKCS11
import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// Hand-written because no maintained Swift library binds PKCS#11: a small layer over the C interface (the header
// from Debian's libp11-kit-dev), loading the module with dlopen. Only what signing with a token-held EC/Ed25519 key
// needs: slots, sessions, login, find, generate, read public attributes, sign.

/// A loaded PKCS#11 module (one per file per process: C_Initialize may only be called once).
final class PKCS11Module: @unchecked Sendable {
    let path: String
    let functions: UnsafeMutablePointer<CK_FUNCTION_LIST>

    private init(path: String, functions: UnsafeMutablePointer<CK_FUNCTION_LIST>) {
        self.path = path
        self.functions = functions
    }

    private static let loaded = Mutex<[String: PKCS11Module]>([:])

    static func load(_ path: String) throws -> PKCS11Module {
        try loaded.withLock { table in
            if let module = table[path] { return module }
            guard FileManager.default.fileExists(atPath: path) else {
                throw PKCS11Error(.moduleUnloadable, "the PKCS#11 module \(path) does not exist (is the package installed?)")
            }
            guard let handle = dlopen(path, RTLD_NOW | RTLD_LOCAL) else {
                let why = dlerror().map { String(cString: $0) } ?? "unknown error"
                throw PKCS11Error(.moduleUnloadable, "cannot load the PKCS#11 module \(path): \(why)")
            }
            guard let symbol = dlsym(handle, "C_GetFunctionList") else {
                dlclose(handle)
                throw PKCS11Error(.moduleUnloadable, "\(path) is not a PKCS#11 module (no C_GetFunctionList)")
            }
            typealias GetFunctionList = @convention(c) (UnsafeMutablePointer<UnsafeMutablePointer<CK_FUNCTION_LIST>?>?) -> CK_RV
            let getFunctionList = unsafeBitCast(symbol, to: GetFunctionList.self)
            var list: UnsafeMutablePointer<CK_FUNCTION_LIST>?
            let rv = getFunctionList(&list)
            guard rv == CKR_OK, let list, let initialize = list.pointee.C_Initialize else {
                throw PKCS11Error(.moduleUnloadable, "\(path): C_GetFunctionList failed (\(PKCS11.name(rv)))", returnValue: rv)
            }
            var arguments = CK_C_INITIALIZE_ARGS()
            arguments.flags = CK_FLAGS(CKF_OS_LOCKING_OK)
            let initialized = withUnsafeMutablePointer(to: &arguments) { initialize(UnsafeMutableRawPointer($0)) }
            guard initialized == CKR_OK || initialized == CKR_CRYPTOKI_ALREADY_INITIALIZED else {
                throw PKCS11Error(
                    .moduleUnloadable, "\(path): C_Initialize failed (\(PKCS11.name(initialized)))", returnValue: initialized
                )
            }
            let module = PKCS11Module(path: path, functions: list)
            table[path] = module
            return module
        }
    }

    var f: CK_FUNCTION_LIST { functions.pointee }
}

/// Names for the return values Mutual reports, and the mapping of CKR_* to stable codes.
enum PKCS11 {
    static func name(_ rv: CK_RV) -> String {
        let names: [CK_RV: String] = [
            CK_RV(CKR_OK): "CKR_OK", CK_RV(CKR_GENERAL_ERROR): "CKR_GENERAL_ERROR",
            CK_RV(CKR_ARGUMENTS_BAD): "CKR_ARGUMENTS_BAD", CK_RV(CKR_DEVICE_ERROR): "CKR_DEVICE_ERROR",
            CK_RV(CKR_DEVICE_REMOVED): "CKR_DEVICE_REMOVED", CK_RV(CKR_TOKEN_NOT_PRESENT): "CKR_TOKEN_NOT_PRESENT",
            CK_RV(CKR_TOKEN_NOT_RECOGNIZED): "CKR_TOKEN_NOT_RECOGNIZED", CK_RV(CKR_SLOT_ID_INVALID): "CKR_SLOT_ID_INVALID",
            CK_RV(CKR_SESSION_HANDLE_INVALID): "CKR_SESSION_HANDLE_INVALID", CK_RV(CKR_SESSION_CLOSED): "CKR_SESSION_CLOSED",
            CK_RV(CKR_PIN_INCORRECT): "CKR_PIN_INCORRECT", CK_RV(CKR_PIN_LOCKED): "CKR_PIN_LOCKED",
            CK_RV(CKR_PIN_LEN_RANGE): "CKR_PIN_LEN_RANGE", CK_RV(CKR_USER_NOT_LOGGED_IN): "CKR_USER_NOT_LOGGED_IN",
            CK_RV(CKR_USER_PIN_NOT_INITIALIZED): "CKR_USER_PIN_NOT_INITIALIZED",
            CK_RV(CKR_MECHANISM_INVALID): "CKR_MECHANISM_INVALID", CK_RV(CKR_KEY_HANDLE_INVALID): "CKR_KEY_HANDLE_INVALID",
            CK_RV(CKR_OBJECT_HANDLE_INVALID): "CKR_OBJECT_HANDLE_INVALID", CK_RV(CKR_TEMPLATE_INCONSISTENT): "CKR_TEMPLATE_INCONSISTENT",
            CK_RV(CKR_ATTRIBUTE_TYPE_INVALID): "CKR_ATTRIBUTE_TYPE_INVALID", CK_RV(CKR_ATTRIBUTE_SENSITIVE): "CKR_ATTRIBUTE_SENSITIVE",
            CK_RV(CKR_DOMAIN_PARAMS_INVALID): "CKR_DOMAIN_PARAMS_INVALID", CK_RV(CKR_CURVE_NOT_SUPPORTED): "CKR_CURVE_NOT_SUPPORTED",
            CK_RV(CKR_FUNCTION_FAILED): "CKR_FUNCTION_FAILED", CK_RV(CKR_CRYPTOKI_NOT_INITIALIZED): "CKR_CRYPTOKI_NOT_INITIALIZED",
            CK_RV(CKR_OPERATION_ACTIVE): "CKR_OPERATION_ACTIVE", CK_RV(CKR_BUFFER_TOO_SMALL): "CKR_BUFFER_TOO_SMALL",
            CK_RV(CKR_KEY_TYPE_INCONSISTENT): "CKR_KEY_TYPE_INCONSISTENT", CK_RV(CKR_TOKEN_WRITE_PROTECTED): "CKR_TOKEN_WRITE_PROTECTED",
        ]
        return names[rv] ?? String(format: "CKR 0x%lx", rv)
    }

    /// Return values meaning "the token (or our sessions on it) went away": the sessions are dropped and reopened
    /// on the next use, so a token put back is used again without a restart.
    static func meansGone(_ rv: CK_RV) -> Bool {
        [
            CKR_DEVICE_REMOVED, CKR_TOKEN_NOT_PRESENT, CKR_TOKEN_NOT_RECOGNIZED, CKR_SESSION_HANDLE_INVALID, CKR_SESSION_CLOSED,
            CKR_DEVICE_ERROR, CKR_SLOT_ID_INVALID, CKR_USER_NOT_LOGGED_IN, CKR_KEY_HANDLE_INVALID, CKR_OBJECT_HANDLE_INVALID,
            CKR_CRYPTOKI_NOT_INITIALIZED,
        ].map(CK_RV.init).contains(rv)
    }

    static func check(_ rv: CK_RV, _ what: @autoclosure () -> String) throws {
        guard rv != CKR_OK else { return }
        let code: PKCS11Error.Code
        switch rv {
        case CK_RV(CKR_PIN_INCORRECT), CK_RV(CKR_PIN_LEN_RANGE): code = .pinIncorrect
        case CK_RV(CKR_PIN_LOCKED): code = .pinLocked
        case _ where meansGone(rv): code = .tokenRemoved
        case CK_RV(CKR_MECHANISM_INVALID), CK_RV(CKR_CURVE_NOT_SUPPORTED), CK_RV(CKR_DOMAIN_PARAMS_INVALID),
            CK_RV(CKR_KEY_TYPE_INCONSISTENT):
            code = .unsupportedKey
        default: code = .failed
        }
        throw PKCS11Error(code, "\(what()): \(name(rv))", returnValue: rv)
    }

    /// Fixed-width, space-padded CK_UTF8CHAR fields (token label, manufacturer, ...) as a trimmed string.
    static func text<T>(_ field: T) -> String {
        withUnsafeBytes(of: field) { raw in
            String(decoding: raw, as: UTF8.self).trimmingCharacters(in: CharacterSet(charactersIn: " \0"))
        }
    }
}

/// Attribute templates own their value buffers for as long as the C call that reads them.
final class AttributeTemplate {
    private(set) var attributes: [CK_ATTRIBUTE] = []
    private var buffers: [UnsafeMutableRawPointer] = []

    init() {}

    deinit { buffers.forEach { $0.deallocate() } }

    func add(_ type: CK_ATTRIBUTE_TYPE, bytes: [UInt8]) {
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: max(bytes.count, 1), alignment: 8)
        bytes.withUnsafeBytes { buffer.copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
        buffers.append(buffer)
        attributes.append(CK_ATTRIBUTE(type: type, pValue: buffer, ulValueLen: CK_ULONG(bytes.count)))
    }

    func add(_ type: UInt, bool: Bool) { add(type, bytes: [bool ? 1 : 0]) }

    func add(_ type: UInt, ulong value: UInt) {
        add(type, bytes: withUnsafeBytes(of: CK_ULONG(value)) { Array($0) })
    }

    func withPointer<T>(_ body: (UnsafeMutablePointer<CK_ATTRIBUTE>, CK_ULONG) throws -> T) rethrows -> T {
        try attributes.withUnsafeMutableBufferPointer { try body($0.baseAddress!, CK_ULONG($0.count)) }
    }
}
