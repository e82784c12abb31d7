//! Responses: small, complete byte strings written like any other frame.

use std::sync::Arc;

use crate::hub::Frame;

#[derive(Debug, Clone, Copy)]
pub struct Status(pub u16);

impl Status {
    pub fn reason(self) -> &'static str {
        match self.0 {
            100 => "Continue",
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            413 => "Content Too Large",
            417 => "Expectation Failed",
            431 => "Request Header Fields Too Large",
            500 => "Internal Server Error",
            503 => "Service Unavailable",
            _ => "Unknown",
        }
    }
}

/// A complete response with a `text/plain` (or given) body.
pub fn response(
    status: Status,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
    extra_headers: &[(&str, &str)],
) -> Arc<Frame> {
    let mut bytes = Vec::with_capacity(160 + body.len());
    bytes.extend_from_slice(format!("HTTP/1.1 {} {}\r\n", status.0, status.reason()).as_bytes());
    bytes.extend_from_slice(
        format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
            body.len()
        )
        .as_bytes(),
    );
    bytes.extend_from_slice(b"Cache-Control: no-store\r\n");
    for (name, value) in extra_headers {
        bytes.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    bytes.extend_from_slice(if keep_alive {
        b"Connection: keep-alive\r\n\r\n"
    } else {
        b"Connection: close\r\n\r\n"
    });
    bytes.extend_from_slice(body);
    Frame::control(bytes)
}

/// The head of an event stream, with the opening comment that makes proxies
/// and clients see the stream start at once. The body is not chunked: it
/// ends when the connection does, so every subscriber is written the same
/// frame bytes with no per-connection framing.
pub fn stream_head() -> Arc<Frame> {
    Frame::control(
        &b"HTTP/1.1 200 OK\r\n\
           Content-Type: text/event-stream\r\n\
           Cache-Control: no-cache\r\n\
           X-Accel-Buffering: no\r\n\
           Connection: close\r\n\
           \r\n\
           :ok\n\n"[..],
    )
}
