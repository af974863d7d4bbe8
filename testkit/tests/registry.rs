//! The test registry starts, logs requests, stops and restarts on the same port.

use std::time::Duration;

use stoker_testkit::registry::TestRegistry;
use stoker_testkit::require_tool;

/// `GET /v2/` over a plain socket; `None` if nothing accepts the connection.
fn get_v2(host: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(host).ok()?;
    let request = format!("GET /v2/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.get(9..12)?.parse().ok()
}

#[test]
fn registry_starts_logs_stops_and_restarts() {
    if !require_tool("registry_starts_logs_stops_and_restarts", "docker-registry") {
        return;
    }
    let mut registry = TestRegistry::start().expect("registry starts");
    assert!(registry.host().starts_with("127.0.0.1:"));
    assert!(
        registry.requests().is_empty(),
        "readiness probes are not reported"
    );

    let host = registry.host();
    assert_eq!(get_v2(&host), Some(200));
    let (requests, seen) = registry.wait_for_requests(Duration::from_secs(10), |r| !r.is_empty());
    assert!(seen, "request logged");
    assert_eq!(requests[0].method, "GET");
    assert_eq!(requests[0].path, "/v2/");
    assert_eq!(requests[0].status, 200);

    registry.clear_requests();
    assert!(registry.requests().is_empty());

    registry.stop();
    assert!(!registry.is_running());
    assert_eq!(get_v2(&host), None, "nothing answers while stopped");

    let port = registry.port();
    registry.restart().expect("registry restarts");
    assert_eq!(registry.port(), port);
    assert_eq!(get_v2(&host), Some(200));
}
