//! HTTP/1.1 on top of `httparse`: request heads, routes, bodies, responses.
//!
//! Nothing here does I/O. The connection state machine feeds bytes in and
//! gets back a [`Request`] (or a [`Rejection`]: a status and a one-line
//! reason), and writes the bytes of a [`response`] out.

mod body;
/// The request path as one function of bytes: the fuzz target's and the
/// corpus replay test's driver.
#[doc(hidden)]
pub mod fuzz;
mod request;
mod response;

pub use body::{BodyReader, ChunkedDecoder};
pub use request::{parse_head, BodyKind, Limits, Rejection, Request, Route};
pub use response::{response, stream_head, Status};
