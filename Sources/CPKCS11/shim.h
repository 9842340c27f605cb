// The PKCS#11 (Cryptoki) interface as shipped by Debian's libp11-kit-dev, in its compatibility names
// (CK_FUNCTION_LIST, pValue, ...). Modules are loaded with dlopen at run time; nothing here is linked to a module.
#include <p11-kit/pkcs11.h>
