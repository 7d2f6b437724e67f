//! A request head hyper could not read: its bare answer, written as a problem document.
//!
//! hyper answers an HTTP/1 head it cannot parse itself, before any of the gateway runs: a
//! malformed request line or header field (400), a target over 64 KiB (414), a head past
//! the buffer it allows or with too many fields (431, `request_head::HARD_HEAD_BYTES`). Its
//! answer is always the same few bytes: the status line, `connection: close`,
//! `content-length: 0` and `date`, and no body. No answer of the gateway's own has that shape
//! (each carries a content type and a request id), so the connection's stream
//! (`server::FirstBytes`) knows one by its bytes as hyper writes it, and writes in its place
//! the same status as a problem document (RFC 9457), like every other refusal: a caller is
//! told what was wrong, with a request id the server log's line names. The connection still
//! closes after it. (HTTP/2's refusals are frames on a stream, and stay hyper's.)

use std::io::IoSlice;

use crate::error::GatewayError;
use crate::request_head::MAX_URI_BYTES;
use crate::request_head::{HARD_HEAD_BYTES, HARD_HEADERS, MAX_HEAD_BYTES, MAX_HEADERS};

/// What hyper writes after the status line, longest first: `connection: close`, but on a
/// connection kept alive under HTTP/1.0, where it answers in HTTP/1.0 and names no
/// connection (`date`'s value is always 29 bytes, RFC 9110's IMF-fixdate).
const AFTER_STATUS: [&[u8]; 2] = [
    b"\r\nconnection: close\r\ncontent-length: 0\r\ndate: ",
    b"\r\ncontent-length: 0\r\ndate: ",
];
const DATE_LEN: usize = 29;
const END: &[u8] = b"\r\n\r\n";

/// The versions hyper answers in.
const VERSIONS: [&[u8]; 2] = [b"HTTP/1.1", b"HTTP/1.0"];
const VERSION_LEN: usize = 8;

/// The status lines (after the version) hyper answers a head it cannot read with, and what
/// each one means.
const STATUS_LINES: [(&[u8], Unread); 3] = [
    (b" 400 Bad Request", Unread::Malformed),
    (b" 414 URI Too Long", Unread::TargetTooLong),
    (b" 431 Request Header Fields Too Large", Unread::TooLarge),
];

/// The longest answer of hyper's this module knows.
const LONGEST: usize = VERSION_LEN + 36 + AFTER_STATUS[0].len() + DATE_LEN + END.len();

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unread {
    Malformed,
    TargetTooLong,
    TooLarge,
}

impl Unread {
    fn error(self) -> GatewayError {
        match self {
            Unread::Malformed => GatewayError::BadRequest(
                "the request line or a header field does not follow HTTP/1's syntax (RFC \
                 9112), so nothing of the request was read; the connection is closed"
                    .to_owned(),
            ),
            Unread::TargetTooLong => GatewayError::UriTooLong(MAX_URI_BYTES),
            Unread::TooLarge => GatewayError::HeadTooLarge(format!(
                "the request line and headers are larger than the gateway reads at all (over \
                 {HARD_HEAD_BYTES} bytes, or over {HARD_HEADERS} header fields); it takes at \
                 most {MAX_HEAD_BYTES} bytes and {MAX_HEADERS} fields"
            )),
        }
    }
}

/// hyper's answer found at the end of a write, and the problem document to write instead.
#[derive(Debug)]
pub(crate) struct Found {
    /// Where in the write hyper's answer begins (what comes before it is the end of an earlier
    /// answer, and is written as it is).
    pub at: usize,
    /// The whole answer to write in its place.
    pub answer: Vec<u8>,
    pub request_id: String,
}

/// Whether the bytes of `bufs`, one write, end with hyper's answer to a head it could not
/// read (the answer is the last thing hyper writes on the connection). Cheap on every other
/// write: one that does not end with a blank line is passed over at its last byte.
pub(crate) fn find(bufs: &[IoSlice<'_>]) -> Option<Found> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let last = bufs.iter().rev().find(|b| !b.is_empty())?;
    if !last.ends_with(b"\n") {
        return None;
    }
    // The write's last bytes, across its slices.
    let n = total.min(LONGEST);
    let mut buf = [0; LONGEST];
    let tail = &mut buf[..n];
    let mut fill = n;
    for buf in bufs.iter().rev() {
        let take = buf.len().min(fill);
        tail[fill - take..fill].copy_from_slice(&buf[buf.len() - take..]);
        fill -= take;
        if fill == 0 {
            break;
        }
    }
    let date_at = n.checked_sub(END.len() + DATE_LEN)?;
    if !tail.ends_with(END) {
        return None;
    }
    let date = &tail[date_at..date_at + DATE_LEN];
    if !date.ends_with(b" GMT") || !date.is_ascii() {
        return None;
    }
    let after = AFTER_STATUS
        .iter()
        .find(|after| tail[..date_at].ends_with(after))?;
    let status_end = date_at - after.len();
    let (line, unread) = STATUS_LINES
        .iter()
        .find(|(line, _)| tail[..status_end].ends_with(line))?;
    let version_at = (status_end - line.len()).checked_sub(VERSION_LEN)?;
    let version = &tail[version_at..version_at + VERSION_LEN];
    if !VERSIONS.contains(&version) {
        return None;
    }
    let request_id = crate::gateway::new_request_id();
    Some(Found {
        at: total - (n - version_at),
        answer: problem_answer(*unread, version, date, &request_id),
        request_id,
    })
}

/// The answer written in place of hyper's: its version, status and date, as a problem
/// document.
fn problem_answer(unread: Unread, version: &[u8], date: &[u8], request_id: &str) -> Vec<u8> {
    let err = unread.error();
    let body = serde_json::to_vec(&err.problem(request_id)).unwrap_or_default();
    let status = err.status();
    let mut out = version.to_vec();
    out.extend_from_slice(
        format!(
            " {} {}\r\ncontent-type: application/problem+json\r\ncache-control: \
         no-store\r\nx-content-type-options: nosniff\r\nx-request-id: {request_id}\r\n\
         connection: close\r\ncontent-length: {}\r\ndate: ",
            status.as_str(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(date);
    out.extend_from_slice(END);
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATE: &str = "Mon, 07 Dec 2026 06:53:11 GMT";

    fn hypers(line: &str) -> String {
        format!("{line}\r\nconnection: close\r\ncontent-length: 0\r\ndate: {DATE}\r\n\r\n")
    }

    /// hyper's answer on a connection kept alive under HTTP/1.0.
    #[test]
    fn an_http10_answer_is_found_too() {
        let bytes =
            format!("HTTP/1.0 400 Bad Request\r\ncontent-length: 0\r\ndate: {DATE}\r\n\r\n");
        let found = find(&[IoSlice::new(bytes.as_bytes())]).unwrap();
        assert_eq!(found.at, 0);
        let (head, problem) = problem(&found);
        assert!(head.starts_with("HTTP/1.0 400 Bad Request\r\n"), "{head}");
        assert_eq!(problem["type"], "urn:wardgate:problem:bad-request");
        for other in ["HTTP/2.0", "HTTP/1.2", "XTTP/1.0"] {
            let bytes = bytes.replace("HTTP/1.0", other);
            assert!(find(&[IoSlice::new(bytes.as_bytes())]).is_none(), "{other}");
        }
    }

    fn problem(found: &Found) -> (String, serde_json::Value) {
        let text = String::from_utf8(found.answer.clone()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains("content-type: application/problem+json"),
            "{head}"
        );
        assert!(head.contains(&format!("x-request-id: {}", found.request_id)));
        assert!(head.contains(&format!("\r\ndate: {DATE}")), "{head}");
        assert!(head.contains("\r\nconnection: close"), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())));
        (head.to_owned(), serde_json::from_str(body).unwrap())
    }

    #[test]
    fn each_of_hypers_answers_becomes_its_problem() {
        for (line, status, kind) in [
            ("HTTP/1.1 400 Bad Request", 400, "bad-request"),
            ("HTTP/1.1 414 URI Too Long", 414, "uri-too-long"),
            (
                "HTTP/1.1 431 Request Header Fields Too Large",
                431,
                "request-head-too-large",
            ),
        ] {
            let bytes = hypers(line);
            let found = find(&[IoSlice::new(bytes.as_bytes())]).expect(line);
            assert_eq!(found.at, 0);
            let (head, problem) = problem(&found);
            assert!(head.starts_with(line), "{head}");
            assert_eq!(problem["status"], status);
            assert_eq!(problem["type"], format!("urn:wardgate:problem:{kind}"));
            assert_eq!(problem["request_id"], found.request_id.as_str());
            assert!(!problem["detail"].as_str().unwrap().is_empty());
        }
    }

    /// After the end of an earlier answer still unsent, and across slices however cut.
    #[test]
    fn found_at_the_end_of_a_write_across_slices() {
        let earlier = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        let all = format!("{earlier}{}", hypers("HTTP/1.1 400 Bad Request"));
        for cut in [1, 7, earlier.len(), earlier.len() + 3, all.len() - 1] {
            let (a, b) = all.as_bytes().split_at(cut);
            let found = find(&[IoSlice::new(a), IoSlice::new(&[]), IoSlice::new(b)]).unwrap();
            assert_eq!(found.at, earlier.len(), "cut at {cut}");
        }
    }

    /// Nothing of the gateway's own answers, nor anything short of hyper's whole answer.
    #[test]
    fn other_writes_are_left_alone() {
        let hyper = hypers("HTTP/1.1 400 Bad Request");
        let ours = "HTTP/1.1 400 Bad Request\r\ncontent-type: application/problem+json\r\n\
                    connection: close\r\ncontent-length: 0\r\ndate: Mon, 07 Dec 2026 06:53:11 \
                    GMT\r\n\r\n";
        let other_status = hypers("HTTP/1.1 404 Not Found");
        for bytes in [
            "",
            "{\"records\":[]}",
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            &hyper[..hyper.len() - 1],
            &hyper[1..],
            ours,
            &other_status,
            &hyper.replace("content-length: 0", "content-length: 1"),
        ] {
            assert!(
                find(&[IoSlice::new(bytes.as_bytes())]).is_none(),
                "{bytes:?}"
            );
        }
    }
}
