//! The relay's HTTP endpoints, read the way a probe or a scraper would.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::RelayLog;

/// One HTTP/1.1 GET; returns (status, body).
pub async fn get(address: &str, path: &str) -> (u16, String) {
    try_get(address, path)
        .await
        .unwrap_or_else(|e| panic!("GET http://{address}{path}: {e}"))
}

/// One HTTP/1.1 GET, or why it got no answer (e.g. nothing listens yet).
pub async fn try_get(address: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(address).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Where the relay's endpoints listen, from its log line.
pub async fn endpoint_address(log: &RelayLog, deadline: Duration) -> String {
    let line = log
        .wait_for_line("metrics and health endpoints listening", deadline)
        .await;
    line.split("address=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the log line names the address")
        .to_owned()
}

/// A metric's value in the text exposition.
pub fn value(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

pub async fn metric(address: &str, name: &str) -> f64 {
    let (status, body) = get(address, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    value(&body, name).unwrap_or_else(|| panic!("no {name} in:\n{body}"))
}
