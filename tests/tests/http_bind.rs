//! The agent's HTTP port answers on both address families by default: with hostNetwork the
//! kubelet probes it at the node's address, IPv6 on an IPv6-only cluster. Runs inside a network
//! namespace of its own, where `net.ipv6.bindv6only=1` would make a plain `[::]` socket IPv6-only.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::Result;
use policy_tests::{netns::NetNs, require_root};

fn get_healthz(addr: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn the_default_address_serves_ipv4_and_ipv6() -> Result<()> {
    require_root();
    let ns = NetNs::new("hbind")?;
    ns.sh("sysctl -qw net.ipv6.bindv6only=1")?;
    let default = <policy_agent::cli::Args as clap::Parser>::try_parse_from([
        "policy-agent",
        "--node-name",
        "n",
    ])?
    .http_addr;
    assert!(
        default.is_ipv6() && default.ip().is_unspecified(),
        "{default}"
    );
    ns.run(|| -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let listener = policy_agent::http::bind(SocketAddr::new(default.ip(), 0)).await?;
            let port = listener.local_addr()?.port();
            let app = serve_agent_router(listener);
            let client = tokio::task::spawn_blocking(move || -> Result<()> {
                for addr in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
                    let reply = get_healthz(addr.parse()?)?;
                    assert!(reply.starts_with("HTTP/1.1 200"), "{addr}: {reply}");
                    assert!(reply.ends_with("ok"), "{addr}: {reply}");
                }
                Ok(())
            });
            tokio::select! {
                r = client => r?,
                r = app => { r?; anyhow::bail!("server stopped") }
            }
        })
    })?;
    // A plain socket on [::] in this namespace is IPv6-only: the check above could fail.
    ns.run(|| -> Result<()> {
        let plain = std::net::TcpListener::bind("[::]:0")?;
        let port = plain.local_addr()?.port();
        assert!(
            TcpStream::connect_timeout(
                &format!("127.0.0.1:{port}").parse()?,
                Duration::from_secs(2)
            )
            .is_err(),
            "bindv6only=1 should make a plain [::] socket refuse IPv4"
        );
        Ok(())
    })?;
    Ok(())
}

/// Serves `/healthz` of the agent's own router on `listener`.
async fn serve_agent_router(listener: tokio::net::TcpListener) -> Result<()> {
    use policy_agent::{http, metrics::Metrics, sources::SourceHealth};
    let metrics = std::sync::Arc::new(Metrics::new());
    let state = http::HttpState {
        status: Default::default(),
        metrics: metrics.clone(),
        log: None,
        source: SourceHealth::new(metrics.source_errors.clone(), metrics.source_lists.clone()),
        flows: None,
        http_flows: false,
        explain: None,
    };
    http::serve(listener, state, std::future::pending()).await?;
    Ok(())
}
