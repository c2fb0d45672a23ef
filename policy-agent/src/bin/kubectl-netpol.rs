//! `kubectl netpol`: a kubectl plugin (any `kubectl-netpol` on `PATH`) for policy authors.
fn main() -> std::process::ExitCode {
    policy_agent::netpol::main()
}
