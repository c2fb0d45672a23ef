//! A node network namespace and a pod network namespace joined by a veth pair, shaped like a
//! point-to-point CNI: the pod's address on its `eth0`, the host side (`host_if`) in the node.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Result;

use crate::netns::{NetNs, unique_name, veth};

pub struct NodeWithPod {
    pub node: NetNs,
    pub pod: NetNs,
    /// Host-side veth name (in `node`).
    pub host_if: String,
    pub node_ip: Ipv4Addr,
    pub pod_ip: Ipv4Addr,
}

impl NodeWithPod {
    /// `subnet` is the third octet of 10.200.X.0/30: node .1, pod .2.
    pub fn create(tag: &str, subnet: u8) -> Result<Self> {
        let base = unique_name(tag);
        let node = NetNs::named(format!("{base}-node"))?;
        let pod = NetNs::named(format!("{base}-pod"))?;
        let host_if = format!("pav{subnet}h");
        veth(&node, &host_if, &pod, "eth0")?;
        let node_ip = Ipv4Addr::new(10, 200, subnet, 1);
        let pod_ip = Ipv4Addr::new(10, 200, subnet, 2);
        node.ip(&["addr", "add", &format!("{node_ip}/30"), "dev", &host_if])?;
        pod.ip(&["addr", "add", &format!("{pod_ip}/30"), "dev", "eth0"])?;
        Ok(Self {
            node,
            pod,
            host_if,
            node_ip,
            pod_ip,
        })
    }
}

/// TCP listeners accepting (and immediately closing) connections inside a namespace until dropped.
pub struct TcpResponder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpResponder {
    pub fn start(ns: &NetNs, ports: &[u16]) -> Result<Self> {
        let listeners = ns.run(|| {
            ports
                .iter()
                .map(|p| {
                    let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, *p))?;
                    l.set_nonblocking(true)?;
                    Ok(l)
                })
                .collect::<Result<Vec<_>>>()
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                for l in &listeners {
                    while let Ok((conn, _)) = l.accept() {
                        drop(conn);
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for TcpResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether a TCP handshake from inside `ns` to `addr` completes within `timeout`.
pub fn tcp_connects(ns: &NetNs, addr: SocketAddr, timeout: Duration) -> Result<bool> {
    Ok(ns.run(|| TcpStream::connect_timeout(&addr, timeout).is_ok()))
}
