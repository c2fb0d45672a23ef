//! Loads the eBPF dataplane into network namespaces it creates and shows one flow passing and one
//! dropped; everything it creates is removed on exit.

use anyhow::{Result, ensure};
use policy_tests::{require_root, scenario};

fn main() -> Result<()> {
    require_root();
    let outcome = scenario::allow_80_deny_81(&mut |line| println!("{line}"))?;
    let show = |port, ok| {
        println!(
            "TCP to pod port {port}: {}",
            if ok { "connected" } else { "dropped" }
        )
    };
    show(80, outcome.port_80_connected);
    show(81, outcome.port_81_connected);
    ensure!(
        outcome.port_80_connected && !outcome.port_81_connected,
        "expected port 80 allowed and port 81 dropped"
    );
    println!("ok: TCP/80 passed, TCP/81 dropped by policy; namespaces removed");
    Ok(())
}
