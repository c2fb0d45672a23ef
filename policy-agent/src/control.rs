//! `policy-agent control`: the client of a running agent's control socket (see `http`), for
//! operators on the node or in the agent's container:
//!
//! ```text
//! kubectl -n policy-agent exec ds/policy-agent -- policy-agent control loglevel debug
//! ```
//!
//! It speaks just enough HTTP/1.1 over the Unix socket for the agent's own server: one request
//! per connection, a `Content-Length` or chunked body.

use std::{
    io::{self, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Parser, Subcommand};

use crate::cli::DEFAULT_CONTROL_SOCKET;

/// Talks to the policy-agent running on this node, over its control socket.
#[derive(Clone, Debug, Parser)]
#[command(name = "policy-agent control")]
pub struct ControlArgs {
    /// The agent's control socket (its --control-socket).
    #[arg(
        long,
        env = "POLICY_AGENT_CONTROL_SOCKET",
        default_value = DEFAULT_CONTROL_SOCKET
    )]
    pub control_socket: PathBuf,

    #[command(subcommand)]
    pub request: Request,
}

#[derive(Clone, Debug, Subcommand)]
pub enum Request {
    /// Print the log filter, or replace it (tracing EnvFilter syntax, e.g. `debug` or
    /// `info,policy_agent::sync=trace`).
    Loglevel { filter: Option<String> },
    /// Print the agent's status (JSON).
    Status,
    /// Print this node's recent flows, one JSON object per line, oldest first.
    Flows(crate::flowstore::FlowQuery),
    /// Explain one flow from this node's kernel maps beside the evaluator (JSON).
    Explain(crate::live::ExplainQuery),
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("agent at {addr}: {source}")]
    Tcp {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("control socket {path}: malformed response: {what}")]
    Malformed { path: PathBuf, what: String },
    #[error("{method} {target}: HTTP {code}: {body}")]
    Refused {
        method: &'static str,
        target: String,
        code: u16,
        body: String,
    },
}

/// Runs one request; returns the body to print.
pub fn run(args: &ControlArgs) -> Result<String, ControlError> {
    let (method, target, body) = match &args.request {
        Request::Loglevel { filter: None } => ("GET", "/loglevel".to_string(), None),
        Request::Loglevel { filter: Some(f) } => ("PUT", "/loglevel".into(), Some(f.as_str())),
        Request::Status => ("GET", "/status".into(), None),
        Request::Flows(query) => ("GET", format!("/flows?{}", query.to_query_string()), None),
        Request::Explain(query) => ("GET", query.target(), None),
    };
    let (code, text) = request(&args.control_socket, method, &target, body)?;
    if code != 200 {
        return Err(ControlError::Refused {
            method,
            target,
            code,
            body: text.trim().to_string(),
        });
    }
    Ok(text)
}

/// One HTTP request over the Unix socket at `path`: the status code and the body.
pub fn request(
    path: &Path,
    method: &str,
    target: &str,
    body: Option<&str>,
) -> Result<(u16, String), ControlError> {
    request_within(path, method, target, body, Duration::from_secs(10))
}

/// [`request`], waiting at most `timeout` for the response.
pub fn request_within(
    path: &Path,
    method: &str,
    target: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String), ControlError> {
    let io_err = |source| ControlError::Connect {
        path: path.to_path_buf(),
        source,
    };
    let stream = UnixStream::connect(path).map_err(io_err)?;
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    exchange(stream, method, target, body).map_err(|e| match e {
        Exchange::Io(source) => io_err(source),
        Exchange::Malformed(what) => ControlError::Malformed {
            path: path.to_path_buf(),
            what,
        },
    })
}

/// One plain-HTTP request to `addr` (`host:port`), for an agent's `--http-addr`: the status code
/// and the body.
pub fn http_request(addr: &str, target: &str) -> Result<(u16, String), ControlError> {
    let io_err = |source| ControlError::Tcp {
        addr: addr.to_string(),
        source,
    };
    let stream = std::net::TcpStream::connect(addr).map_err(io_err)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io_err)?;
    exchange(stream, "GET", target, None).map_err(|e| match e {
        Exchange::Io(source) => io_err(source),
        Exchange::Malformed(what) => ControlError::Malformed {
            path: PathBuf::from(addr),
            what,
        },
    })
}

enum Exchange {
    Io(io::Error),
    Malformed(String),
}

/// Writes one request (`Connection: close`) and reads the response to the end.
fn exchange(
    mut stream: impl Read + Write,
    method: &str,
    target: &str,
    body: Option<&str>,
) -> Result<(u16, String), Exchange> {
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(Exchange::Io)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(Exchange::Io)?;
    parse_response(&raw).map_err(Exchange::Malformed)
}

/// Status code and body of an HTTP/1.1 response read to the end of the connection.
fn parse_response(raw: &[u8]) -> Result<(u16, String), String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| "headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let code = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("status line {status_line:?}"))?;
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let rest = &raw[split + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else {
        rest.to_vec()
    };
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size without end of line")?;
        let size_text = std::str::from_utf8(&rest[..eol]).map_err(|_| "chunk size not UTF-8")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("chunk size {size_text:?}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if rest.len() < size + 2 {
            return Err("chunk shorter than its size".into());
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_length_and_chunked_bodies() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ninfo";
        assert_eq!(parse_response(plain).unwrap(), (200, "info".into()));
        let chunked =
            b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nbad\r\n2;x=y\r\n!!\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (400, "bad!!".into()));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
        let short = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nff\r\nab\r\n";
        assert!(parse_response(short).is_err());
    }

    #[test]
    fn the_command_line_names_socket_and_request() {
        let a = ControlArgs::try_parse_from([
            "policy-agent control",
            "--control-socket",
            "/tmp/x.sock",
            "loglevel",
            "debug",
        ])
        .unwrap();
        assert_eq!(a.control_socket, PathBuf::from("/tmp/x.sock"));
        assert!(matches!(a.request, Request::Loglevel { filter: Some(ref f) } if f == "debug"));
        assert!(ControlArgs::try_parse_from(["policy-agent control"]).is_err());
    }
}
