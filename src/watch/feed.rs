//! The live feed: access events and alerts as server-sent events, filtered per subscriber.
//!
//! An access event summarises one durable audit record for the security team: who, which
//! purpose and dataset, the decision and how many records left. It never carries the subject
//! ids or field values (those stay in the log, for the data protection officer). A subscriber
//! that falls behind is told how many events it missed rather than slowing anyone down.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::Frame;
use serde_json::json;
use tokio::sync::{broadcast, watch};

use crate::audit::Logged;
use crate::error::GatewayError;

/// A keep-alive comment this often keeps proxies from closing an idle stream.
const HEARTBEAT: Duration = Duration::from_secs(15);

/// One event of the feed, with the attributes subscribers filter on.
#[derive(Debug, Clone)]
pub struct FeedEvent {
    /// `access`, `alert` or `match` (a rule in monitor mode).
    pub kind: &'static str,
    pub id: u64,
    pub principal: Option<String>,
    pub dataset: Option<String>,
    pub purpose: Option<String>,
    pub decision: Option<&'static str>,
    /// The event as JSON.
    pub data: String,
}

impl FeedEvent {
    /// Breach detection fell behind the audit log: `missed` records were examined by no rule.
    /// Not `lagged`, which is one reader's own gap in the feed; every reader gets it
    /// (`Filter::matches`).
    pub fn detection_lagged(missed: u64) -> FeedEvent {
        FeedEvent {
            kind: "detection_lagged",
            id: 0,
            principal: None,
            dataset: None,
            purpose: None,
            decision: None,
            data: format!("{{\"missed\":{missed}}}"),
        }
    }
}

/// The summary of one audit record that the feed shows.
pub fn access_event(logged: &Logged) -> FeedEvent {
    let r = &logged.record;
    let decision = match r.decision {
        crate::audit::Decision::Allow => "allow",
        crate::audit::Decision::Deny => "deny",
        crate::audit::Decision::Error => "error",
    };
    let data = json!({
        "seq": logged.seq,
        "ts": r.ts,
        "kind": r.kind,
        "principal": r.caller.as_ref().map(|c| &c.subject),
        "role": r.caller.as_ref().map(|c| &c.role),
        "unit": r.caller.as_ref().map(|c| &c.unit),
        "token_id": r.caller.as_ref().map(|c| &c.token_id),
        "client_addr": r.client_addr,
        "purpose": r.purpose,
        "lawful_basis": r.lawful_basis,
        "dataset": r.dataset,
        "route": r.route,
        "method": r.method,
        "decision": decision,
        "status": r.status,
        "reason": r.reason,
        // Disclosed: a refusal or error that names its target (a write not sent, an answer
        // held back) disclosed nothing.
        "records": r.disclosed_count(),
        "rows_withheld": r.rows_withheld,
        "withheld_target": r.withheld_target,
    });
    FeedEvent {
        kind: "access",
        id: logged.seq,
        principal: r.caller.as_ref().map(|c| c.subject.clone()),
        dataset: r.dataset.clone(),
        purpose: r.purpose.clone(),
        decision: Some(decision),
        data: data.to_string(),
    }
}

/// What a subscriber asked to see: every given attribute must match.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Filter {
    principal: Option<String>,
    dataset: Option<String>,
    purpose: Option<String>,
    decision: Option<String>,
    kind: Option<String>,
}

impl Filter {
    /// Parses `principal=..&dataset=..&purpose=..&decision=..&kind=..`; anything else is a 400.
    pub fn parse(query: Option<&str>) -> Result<Filter, GatewayError> {
        let mut f = Filter::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_encoding::percent_decode_str(v)
                .decode_utf8()
                .map_err(|_| GatewayError::BadRequest(format!("`{k}` is not UTF-8")))?
                .into_owned();
            let slot = match k {
                "principal" => &mut f.principal,
                "dataset" => &mut f.dataset,
                "purpose" => &mut f.purpose,
                "decision" => &mut f.decision,
                "kind" => &mut f.kind,
                other => {
                    return Err(GatewayError::BadRequest(format!(
                        "`{other}` is not a feed filter; use principal, dataset, purpose, decision or kind"
                    )));
                }
            };
            if slot.replace(v).is_some() {
                return Err(GatewayError::BadRequest(format!("`{k}` is given twice")));
            }
        }
        if let Some(d) = &f.decision
            && !["allow", "deny", "error"].contains(&d.as_str())
        {
            return Err(GatewayError::BadRequest(
                "`decision` is one of allow, deny, error".to_owned(),
            ));
        }
        Ok(f)
    }

    pub fn matches(&self, e: &FeedEvent) -> bool {
        let eq = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| have == Some(w))
        };
        // Detection falling behind is every reader's concern, whatever they filter on.
        if e.kind == "detection_lagged" {
            return true;
        }
        eq(&self.kind, Some(e.kind))
            && eq(&self.principal, e.principal.as_deref())
            && eq(&self.dataset, e.dataset.as_deref())
            && eq(&self.purpose, e.purpose.as_deref())
            && eq(&self.decision, e.decision)
    }
}

pub type FeedBody = UnsyncBoxBody<Bytes, Infallible>;

/// Whether the feed's reader may still be answered (`gateway::standing`), asked before each
/// frame.
pub type Stands = Box<dyn Fn() -> bool + Send + Sync>;

/// The `text/event-stream` body: matching events as they happen, until the gateway stops or
/// the reader no longer stands (revoked, the token ended, the mirror stale: the stream ends,
/// and the browser's reconnection is refused as any request would be).
pub fn stream(
    rx: broadcast::Receiver<Arc<FeedEvent>>,
    filter: Filter,
    stop: watch::Receiver<bool>,
    stands: Stands,
) -> FeedBody {
    let hello = Bytes::from_static(b"retry: 2000\n: wardgate live feed\n\n");
    let state = (rx, filter, stop, stands, Some(hello));
    let events = futures_util::stream::unfold(
        state,
        |(mut rx, filter, mut stop, stands, hello)| async move {
            if let Some(h) = hello {
                return Some((Ok(Frame::data(h)), (rx, filter, stop, stands, None)));
            }
            // A heartbeat once nothing has been sent for `HEARTBEAT`: events the filter passes
            // over do not put it off, or a filtered feed on a busy gateway would send nothing
            // at all, and a proxy in front would cut it as idle.
            let beat_at = tokio::time::Instant::now() + HEARTBEAT;
            loop {
                if *stop.borrow() || !stands() {
                    return None;
                }
                let next = tokio::select! {
                    r = rx.recv() => r,
                    _ = stop.changed() => return None,
                    () = tokio::time::sleep_until(beat_at) => {
                        if !stands() {
                            return None;
                        }
                        let beat = Bytes::from_static(b": keep-alive\n\n");
                        return Some((Ok(Frame::data(beat)), (rx, filter, stop, stands, None)));
                    }
                };
                if !stands() {
                    return None;
                }
                let frame = match next {
                    Ok(e) if filter.matches(&e) => {
                        format!("event: {}\nid: {}\ndata: {}\n\n", e.kind, e.id, e.data)
                    }
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        format!("event: lagged\ndata: {{\"missed\":{n}}}\n\n")
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                };
                return Some((
                    Ok(Frame::data(Bytes::from(frame))),
                    (rx, filter, stop, stands, None),
                ));
            }
        },
    );
    StreamBody::new(events).boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(principal: &str, decision: &'static str) -> FeedEvent {
        FeedEvent {
            kind: "access",
            id: 1,
            principal: Some(principal.into()),
            dataset: Some("voter".into()),
            purpose: Some("canvassing".into()),
            decision: Some(decision),
            data: "{}".into(),
        }
    }

    #[test]
    fn filters_match_every_given_attribute() {
        let f = Filter::parse(Some("principal=demo-councillor&decision=deny")).unwrap();
        assert!(f.matches(&event("demo-councillor", "deny")));
        assert!(!f.matches(&event("demo-councillor", "allow")));
        assert!(!f.matches(&event("someone", "deny")));
        assert!(Filter::parse(None).unwrap().matches(&event("x", "allow")));
        let k = Filter::parse(Some("kind=alert")).unwrap();
        assert!(!k.matches(&event("x", "allow")));
        // Detection falling behind reaches a reader filtering on anything but the kind.
        let lag = FeedEvent::detection_lagged(3);
        assert_eq!(lag.data, r#"{"missed":3}"#);
        assert!(f.matches(&lag));
        assert!(k.matches(&lag));
    }

    #[test]
    fn bad_filters_are_refused() {
        for q in [
            "colour=red",
            "principal=a&principal=b",
            "decision=maybe",
            "dataset=%FF",
        ] {
            assert!(
                matches!(Filter::parse(Some(q)), Err(GatewayError::BadRequest(_))),
                "{q}"
            );
        }
    }

    #[tokio::test]
    async fn the_stream_sends_matching_events_and_ends_at_shutdown() {
        let (tx, rx) = broadcast::channel(16);
        let (stop_tx, stop) = watch::channel(false);
        let stands: Stands = Box::new(|| true);
        let mut body = stream(
            rx,
            Filter::parse(Some("decision=deny")).unwrap(),
            stop,
            stands,
        );
        tx.send(Arc::new(event("a", "allow"))).unwrap();
        tx.send(Arc::new(event("b", "deny"))).unwrap();
        let mut seen = String::new();
        for _ in 0..2 {
            let frame = body.frame().await.unwrap().unwrap();
            seen.push_str(std::str::from_utf8(frame.data_ref().unwrap()).unwrap());
        }
        assert!(seen.contains("event: access\nid: 1\ndata: {}"), "{seen}");
        assert_eq!(seen.matches("event:").count(), 1);
        stop_tx.send(true).unwrap();
        assert!(body.frame().await.is_none());
    }

    /// Events a filter passes over do not put the heartbeat off.
    #[tokio::test(start_paused = true)]
    async fn a_filtered_stream_beats_while_events_it_passes_over_keep_coming() {
        let (tx, rx) = broadcast::channel(16);
        let (_stop_tx, stop) = watch::channel(false);
        let stands: Stands = Box::new(|| true);
        let mut body = stream(
            rx,
            Filter::parse(Some("principal=quiet")).unwrap(),
            stop,
            stands,
        );
        body.frame().await.unwrap().unwrap();
        let busy = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let _ = tx.send(Arc::new(event("busy", "allow")));
            }
        });
        let started = tokio::time::Instant::now();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(
            frame.data_ref().unwrap(),
            &Bytes::from_static(b": keep-alive\n\n")
        );
        assert_eq!(started.elapsed(), HEARTBEAT);
        busy.abort();
    }

    #[tokio::test]
    async fn the_stream_ends_once_its_reader_no_longer_stands() {
        let (tx, rx) = broadcast::channel(16);
        let (_stop_tx, stop) = watch::channel(false);
        let standing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let still = Arc::clone(&standing);
        let stands: Stands = Box::new(move || still.load(std::sync::atomic::Ordering::SeqCst));
        let mut body = stream(rx, Filter::parse(None).unwrap(), stop, stands);
        let hello = body.frame().await.unwrap().unwrap();
        assert!(hello.data_ref().is_some());
        tx.send(Arc::new(event("a", "allow"))).unwrap();
        let frame = body.frame().await.unwrap().unwrap();
        assert!(
            std::str::from_utf8(frame.data_ref().unwrap())
                .unwrap()
                .contains("event: access")
        );
        // Revoked while waiting: the next event is not sent, the stream ends.
        standing.store(false, std::sync::atomic::Ordering::SeqCst);
        tx.send(Arc::new(event("b", "allow"))).unwrap();
        assert!(body.frame().await.is_none());
    }
}
