// The thrift service of the transparent-mode tests (tests/harness/thrift_apps.py).
// TBinaryProtocol over TCP with a buffered transport: what Dubbo/thrift shops run unmodified.

namespace py echo

service Echo {
    // msg, unchanged.
    string echo(1: string msg),
    // The server's --name: tests count which instance answered.
    string whoami(),
    // size bytes of thrift_apps.blob_pattern(size), so a big transfer can be checked byte-exact.
    binary blob(1: i32 size),
}
