//! First kernel test: real packets across a veth, one flow allowed and one dropped according to a
//! POLICY entry written from userspace.

use policy_tests::{require_root, scenario};

#[test]
fn tcp_80_allowed_and_81_dropped_by_map_entry() {
    require_root();
    let outcome =
        scenario::allow_80_deny_81(&mut |line| eprintln!("{line}")).expect("scenario runs");
    assert!(
        outcome.port_80_connected,
        "TCP/80 is allowed by the POLICY entry and must connect"
    );
    assert!(
        !outcome.port_81_connected,
        "TCP/81 has no POLICY entry and must be dropped"
    );
}
