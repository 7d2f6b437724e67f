//! How large a request's head (its request line and headers) may be, and the check that
//! refuses a larger one with a problem document.
//!
//! Two bounds. The gateway's own ([`MAX_HEAD_BYTES`], [`MAX_HEADERS`], [`MAX_URI_BYTES`]) are
//! checked by [`check`] as each plane's first step, so a client whose token carries too many
//! area grants, or whose proxy piles on headers, is told which limit it crossed, as
//! `application/problem+json`, and (on the data plane) in an audit record like any refusal.
//! hyper's ([`HARD_HEAD_BYTES`], [`HARD_HEADERS`]: twice those) bound what a connection will
//! buffer at all: past them hyper answers itself, before any of the gateway runs (HTTP/1: a
//! 431, or 414 for a target over 64 KiB, written as a problem document by `unread_head` and
//! counted by `server::connection_failed`; HTTP/2: a bare 431 on the stream, or a reset for
//! such a target). Between the two, the gateway has
//! the request and says what was wrong with it.

use http::Request;

use crate::error::GatewayError;

/// The largest head the gateway takes, counted as HTTP/1.1 sends it: a token with a thousand
/// area grants is a tenth of it.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The most header fields a request may carry (Envoy's default, and hyper's).
pub const MAX_HEADERS: usize = 100;

/// The longest request target (path and query) the gateway takes, as nginx's default request
/// line: a route's path and its filters (each value at most 64 characters) are far shorter.
pub const MAX_URI_BYTES: usize = 8 * 1024;

/// What hyper buffers of a head before it gives up on the connection (HTTP/1's read buffer,
/// HTTP/2's header list): room for every head [`check`] refuses by its own bounds.
pub const HARD_HEAD_BYTES: usize = 2 * MAX_HEAD_BYTES;

/// The most header fields hyper parses on HTTP/1 before it answers 431 itself (HTTP/2 has no
/// such count: its header list's size bounds it).
pub const HARD_HEADERS: usize = 2 * MAX_HEADERS;

/// Refuses a head past the gateway's bounds: a target too long (414), or headers too many or
/// too large (431). The size is the head as HTTP/1.1 would carry it, whichever version came:
/// an authority in the target (HTTP/2's `:authority`, an HTTP/1 absolute-form target) counts
/// as the `Host` line HTTP/1.1 would carry it in where the request has none, and in the
/// request line where it has one too.
pub fn check<B>(req: &Request<B>) -> Result<(), GatewayError> {
    let uri = req.uri();
    let target = uri.path_and_query().map_or(0, |p| p.as_str().len());
    let host = match (
        uri.authority(),
        req.headers().contains_key(http::header::HOST),
    ) {
        (Some(a), false) => "host: ".len() + a.as_str().len() + 2,
        (Some(a), true) => uri.scheme_str().map_or(0, |s| s.len() + 3) + a.as_str().len(),
        (None, _) => 0,
    };
    if target > MAX_URI_BYTES {
        return Err(GatewayError::UriTooLong(MAX_URI_BYTES));
    }
    let fields = req.headers().len();
    if fields > MAX_HEADERS {
        return Err(GatewayError::HeadTooLarge(format!(
            "the request carries {fields} header fields; at most {MAX_HEADERS} are accepted"
        )));
    }
    // `METHOD target HTTP/1.1\r\n`, each `name: value\r\n`, and the blank line.
    let line = req.method().as_str().len() + 1 + target + 11;
    let size = req
        .headers()
        .iter()
        .fold(line + host + 2, |n, (name, value)| {
            n + name.as_str().len() + 2 + value.len() + 2
        });
    if size > MAX_HEAD_BYTES {
        return Err(GatewayError::HeadTooLarge(format!(
            "the request's line and headers come to {size} bytes; at most {MAX_HEAD_BYTES} are \
             accepted (a token's area grants are the usual cause)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(target: &str, headers: &[(&str, String)]) -> Request<()> {
        let mut b = Request::get(target);
        for (name, value) in headers {
            b = b.header(*name, value);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn a_head_within_every_bound_passes() {
        let headers: Vec<_> = (0..MAX_HEADERS)
            .map(|i| (["x-a", "x-b"][i % 2], "v".repeat(500)))
            .collect();
        let target = format!("/voter/electors?ward={}", "w".repeat(MAX_URI_BYTES - 21));
        assert_eq!(target.len(), MAX_URI_BYTES);
        assert!(check(&request(&target, &headers)).is_ok());
    }

    #[test]
    fn each_bound_is_refused_one_past_it() {
        let target = format!("/voter/electors?ward={}", "w".repeat(MAX_URI_BYTES - 20));
        let err = check(&request(&target, &[])).unwrap_err();
        assert_eq!(err.status(), http::StatusCode::URI_TOO_LONG);
        // An authority counts, as the `Host` line HTTP/1.1 would carry it in: HTTP/2's, or
        // an absolute-form target's.
        let host = format!("{}.example", "h".repeat(MAX_URI_BYTES));
        let padding = [("x-pad", "p".repeat(MAX_HEAD_BYTES - 4 * 1024))];
        assert!(check(&request("/voter", &padding)).is_ok());
        let far = request(&format!("https://{host}/voter"), &padding);
        let err = check(&far).unwrap_err();
        assert_eq!(
            err.status(),
            http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        // With a `Host` line as well, it counts in the request line (HTTP/1's absolute form).
        let both = [padding[0].clone(), ("host", "x".to_owned())];
        let err = check(&request(&format!("https://{host}/voter"), &both)).unwrap_err();
        assert_eq!(
            err.status(),
            http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );

        let headers: Vec<_> = (0..=MAX_HEADERS).map(|_| ("x-a", "v".to_owned())).collect();
        let err = check(&request("/", &headers)).unwrap_err();
        assert_eq!(
            err.status(),
            http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        assert!(err.problem("r").detail.contains("101 header fields"));

        // `GET / HTTP/1.1\r\n` (16), `authorization: ` and its CRLF (17), the blank line (2).
        let exact = MAX_HEAD_BYTES - 16 - 17 - 2;
        let fits = request("/", &[("authorization", "t".repeat(exact))]);
        assert!(check(&fits).is_ok());
        let over = request("/", &[("authorization", "t".repeat(exact + 1))]);
        let err = check(&over).unwrap_err();
        assert_eq!(
            err.status(),
            http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        assert!(err.problem("r").detail.contains("65537 bytes"), "{err}");
    }
}
