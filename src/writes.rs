//! Writes from canvassing tools: what a write body may carry, checked before it is forwarded.
//!
//! A write names only fields its route declares in the asset register (no mass assignment),
//! each of a category the declared purpose may write (Cedar `write_field`), about a record the
//! caller may write to (`write_record`: in scope, no restriction in the way). Anything else is
//! refused by name, before the datastore sees the body. The pipeline itself stays in
//! `gateway.rs`; this module only answers "may this body be written".

use std::collections::BTreeSet;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Limited};

use crate::auth::Principal;
use crate::catalog::Dataset;
use crate::error::GatewayError;
use crate::filter::{self, FilterContext};
use crate::gateway::{Gateway, Trail, fetch_one, malformed, register_now, withheld_why};
use crate::policy::{Ask, PolicyEngine};
use crate::proxy::Upstream;
use crate::routes::Route;

/// How deep a written value may nest. A datastore echoes it back inside a record inside a page
/// (three levels more), and the filter refuses a page deeper than serde_json would read (127
/// levels) as malformed: a value near that limit, once written, would make every page holding
/// its record unreadable for every caller.
const MAX_VALUE_DEPTH: usize = 32;

/// How many arrays and objects deep `v` nests (a scalar: 0).
fn depth(v: &serde_json::Value) -> usize {
    use serde_json::Value;
    match v {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Whether `v` is an object, or an array holding an array or object.
fn nests(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::Object(_) => true,
        Value::Array(items) => items.iter().any(|i| i.is_array() || i.is_object()),
        _ => false,
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "one call site; the pipeline's state, spelt out"
)]
pub(crate) async fn check_write(
    gw: &Gateway,
    engine: &PolicyEngine,
    ask: &Ask,
    dataset: &Dataset,
    route: &Route,
    write: &str,
    id: &str,
    body: &Bytes,
    principal: &Principal,
    upstream: &Upstream,
    request_id: &str,
    trail: &mut Trail,
) -> Result<Vec<String>, GatewayError> {
    let spec = dataset
        .writes
        .get(write)
        .ok_or(GatewayError::RouteNotFound)?;
    let Fields(fields) = serde_json::from_slice(body).map_err(|e| {
        GatewayError::BadRequest(format!(
            "the body must be a JSON object naming each field once ({e})"
        ))
    })?;
    let unknown: Vec<&str> = fields
        .keys()
        .filter(|k| !spec.fields.contains_key(*k))
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        return Err(GatewayError::BadRequest(format!(
            "unknown fields for this write: `{}`",
            unknown.join("`, `")
        )));
    }
    if fields.is_empty() {
        return Err(GatewayError::BadRequest(
            "the body names no field to write".to_owned(),
        ));
    }
    if let Some((name, _)) = fields.iter().find(|(_, v)| depth(v) > MAX_VALUE_DEPTH) {
        return Err(GatewayError::BadRequest(format!(
            "`{name}` is nested more than {MAX_VALUE_DEPTH} levels deep"
        )));
    }
    for (field, allowed) in &spec.values {
        if let Some(value) = fields.get(field)
            && let Err(why) = only_values(field, value, allowed)
        {
            // A refusal by the asset register, logged as one (breach detection counts them):
            // no policy decided it.
            trail.refuse_write(std::slice::from_ref(field), &[]);
            return Err(GatewayError::WriteForbidden(why));
        }
    }
    // A value the filter would take for nested data (`filter::write_record`), once written,
    // would withhold its record from every reader: only a field the asset register names
    // `structured` (or the consents field) may hold an object, or a list of them.
    if let Some((name, _)) = (fields.iter()).find(|(n, v)| nests(v) && !dataset.may_nest(n)) {
        return Err(GatewayError::BadRequest(format!(
            "`{name}` holds an object or a list of lists or objects: the asset register \
             expects a value or a list of values"
        )));
    }
    let (target, envelope) = fetch_one(upstream, dataset, id, request_id, trail).await?;
    let register = register_now(gw, principal)?;
    trail.judged_on = Some(register.clone());
    let cx = &FilterContext::new(dataset, &register);
    // Read as a read of the record would be (the filter's scanner: a field named twice, or a
    // record that cannot be classified, is one the caller may not see). A target we cannot
    // classify, or may not write to, is indistinguishable from a missing one. So is one the
    // datastore answers under another id (it normalised `vf-1` to `VF-1`, say): the write's
    // records name the id asked for, and a subject access search for the record's own id
    // would miss them.
    let (subject, attrs) = match filter::single_attrs(&target, envelope, cx).map_err(malformed)? {
        Some(Some(read)) => read,
        None => return Err(GatewayError::NotFound),
        // Logged and counted as a read of it would be: the datastore holds a record the
        // gateway cannot read (the caller is told only that there is none it may write).
        Some(None) => {
            trail.withhold_target("malformed", Vec::new());
            crate::gateway::count_unread(0, 1);
            return Err(GatewayError::NotFound);
        }
    };
    if subject != id {
        trail.withhold_target("answered_under_another_id", Vec::new());
        return Err(GatewayError::NotFound);
    }
    // Refused as a read would be, and logged as one is (breach detection keys on why).
    let verdict = engine.decide_record(ask, &route.dataset, &attrs, true);
    // Never written through, whatever the policies say (as `filter::memo` never discloses).
    if !verdict.allowed || attrs.never_disclosed() {
        trail.withhold_target(withheld_why(gw, principal, &attrs), verdict.policy_ids);
        return Err(GatewayError::NotFound);
    }
    let wanted: BTreeSet<String> = fields
        .keys()
        .filter_map(|k| spec.fields.get(k).cloned())
        .collect();
    let allowed = engine.allowed_categories(ask, &route.dataset, &attrs, &wanted, true);
    let refused: Vec<String> = fields
        .keys()
        .filter(|k| spec.fields.get(*k).is_none_or(|c| !allowed.contains(c)))
        .cloned()
        .collect();
    if !refused.is_empty() {
        // A refusal by policy, logged as one (breach detection counts refused requests),
        // naming the policies that refused each category (asked again one by one, for their
        // ids: `allowed_categories` keeps only the answers).
        let categories: BTreeSet<&String> = (refused.iter())
            .filter_map(|k| spec.fields.get(k))
            .collect();
        let policy_ids: Vec<String> = (categories.into_iter())
            .flat_map(|c| {
                engine
                    .decide_field(ask, &route.dataset, &attrs, c, true)
                    .policy_ids
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        // (In the record only: they may be a forbid on the target's own flags.)
        trail.refuse_write(&refused, &policy_ids);
        return Err(GatewayError::WriteForbidden(format!(
            "the declared purpose may not write: `{}`",
            refused.join("`, `")
        )));
    }
    // The write's records name what let it through, as a read's name what disclosed: the
    // target's policies and each written category's (asked again for their ids, as above).
    let field_ids = (wanted.iter()).flat_map(|c| {
        engine
            .decide_field(ask, &route.dataset, &attrs, c, true)
            .policy_ids
    });
    trail.decided_by(verdict.policy_ids.into_iter().chain(field_ids));
    Ok(fields
        .keys()
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect())
}

/// A write body's fields, each named once. `serde_json`'s own map keeps the last of a name
/// written twice, while the body is forwarded as it came, and a datastore keeping the first
/// would then write what was never checked: a name written twice (escapes decoded) is refused,
/// in the body and in any object within a value (`Unique`: the depth and nesting checks judge
/// what `serde_json` kept).
struct Fields(serde_json::Map<String, serde_json::Value>);

/// A JSON value in which no object names a key twice, at any depth.
struct Unique(serde_json::Value);

impl<'de> serde::Deserialize<'de> for Unique {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde_json::Value;
        struct Any;
        impl<'de> serde::de::Visitor<'de> for Any {
            type Value = Unique;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E>(self, b: bool) -> Result<Unique, E> {
                Ok(Unique(Value::Bool(b)))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Unique, E> {
                Ok(Unique(n.into()))
            }
            fn visit_u64<E>(self, n: u64) -> Result<Unique, E> {
                Ok(Unique(n.into()))
            }
            fn visit_f64<E>(self, n: f64) -> Result<Unique, E> {
                Ok(Unique(n.into()))
            }
            fn visit_str<E>(self, s: &str) -> Result<Unique, E> {
                Ok(Unique(s.into()))
            }
            fn visit_string<E>(self, s: String) -> Result<Unique, E> {
                Ok(Unique(s.into()))
            }
            fn visit_unit<E>(self) -> Result<Unique, E> {
                Ok(Unique(Value::Null))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Unique, A::Error> {
                let mut items = Vec::new();
                while let Some(Unique(v)) = a.next_element()? {
                    items.push(v);
                }
                Ok(Unique(Value::Array(items)))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, a: A) -> Result<Unique, A::Error> {
                once_each(a).map(|m| Unique(Value::Object(m)))
            }
        }
        d.deserialize_any(Any)
    }
}

/// An object's members, refused where a key is named twice.
fn once_each<'de, A: serde::de::MapAccess<'de>>(
    mut a: A,
) -> Result<serde_json::Map<String, serde_json::Value>, A::Error> {
    let mut members = serde_json::Map::new();
    while let Some((name, Unique(value))) = a.next_entry::<String, Unique>()? {
        if members.contains_key(&name) {
            return Err(serde::de::Error::custom(format_args!(
                "`{name}` is named twice"
            )));
        }
        members.insert(name, value);
    }
    Ok(members)
}

impl<'de> serde::Deserialize<'de> for Fields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Once;
        impl<'de> serde::de::Visitor<'de> for Once {
            type Value = Fields;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, a: A) -> Result<Fields, A::Error> {
                once_each(a).map(Fields)
            }
        }
        d.deserialize_map(Once)
    }
}

/// A field the asset register limits to some strings carries only those: one of them, or a
/// list of them (`values` in the write's entry). Otherwise why not, for the caller only.
fn only_values(field: &str, value: &serde_json::Value, allowed: &[String]) -> Result<(), String> {
    use serde_json::Value;
    let given: Vec<&Value> = match value {
        Value::Array(items) => items.iter().collect(),
        one => vec![one],
    };
    // A write that writes nothing would still read its target back (a read by id outside
    // the read's rules and breach detection's), and the log would name a field not written.
    if given.is_empty() {
        return Err(format!(
            "`{field}` is an empty list: it writes nothing (leave it out)"
        ));
    }
    let refused: Vec<String> = given
        .into_iter()
        .filter(|v| !v.as_str().is_some_and(|s| allowed.iter().any(|a| a == s)))
        .map(Value::to_string)
        .collect();
    if refused.is_empty() {
        return Ok(());
    }
    Err(format!(
        "`{field}` may carry only `{}` through this write, not {}",
        allowed.join("`, `"),
        refused.join(", ")
    ))
}

/// How long a write's body may take to arrive: a caller trickling one out would otherwise
/// hold a connection and a task for as long as it liked.
const BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// Whether the request says its body is JSON (`application/json`, any parameters, any case),
/// as sent: with no content coding but `identity`. A write is read as JSON and forwarded as
/// JSON; a body that says otherwise (gzip-compressed, say) is not read as what its sender
/// meant to write.
pub(crate) fn says_json(headers: &http::HeaderMap) -> bool {
    let plain = (headers.get_all(header::CONTENT_ENCODING).iter()).all(|v| {
        v.to_str().is_ok_and(|v| {
            (v.split(',')).all(|c| c.trim().is_empty() || c.trim().eq_ignore_ascii_case("identity"))
        })
    });
    plain
        && headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

pub(crate) async fn read_body<B>(req: Request<B>, limit: usize) -> Result<Bytes, GatewayError>
where
    B: hyper::body::Body<Data = Bytes> + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .is_some_and(|n| n > limit)
    {
        return Err(GatewayError::PayloadTooLarge);
    }
    let read = Limited::new(req.into_body(), limit).collect();
    let Ok(read) = tokio::time::timeout(BODY_DEADLINE, read).await else {
        return Err(GatewayError::BodyTimeout(BODY_DEADLINE.as_secs()));
    };
    match read {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(GatewayError::PayloadTooLarge),
        Err(e) => Err(GatewayError::BadRequest(format!(
            "the request body could not be read: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::Fields;

    /// A key named twice is refused wherever it is: in the body, or in an object within a
    /// value (which a datastore storing the text as sent would keep whole, while the checks
    /// saw only the last); each value is read as `serde_json` reads it otherwise.
    #[test]
    fn a_key_named_twice_is_refused_at_any_depth() {
        let read = |body: &str| serde_json::from_str::<Fields>(body).map(|Fields(f)| f);
        for body in [
            r#"{"a":1,"a":2}"#,
            r#"{"roles":{"x":[[1]],"x":1}}"#,
            r#"{"roles":[{"unit":"A","unit":"B"}]}"#,
            r#"{"c":{"email":{"given_at":null,"given\u005fat":"2026-01-01"}}}"#,
        ] {
            let e = read(body).expect_err(body).to_string();
            assert!(e.contains("is named twice"), "{body}: {e}");
        }
        let body = r#"{"roles":[{"unit":"A","role":"chair"}],"n":-1.5,"ok":[true,null,"s",7]}"#;
        let fields = read(body).unwrap();
        let plain: serde_json::Map<String, serde_json::Value> = serde_json::from_str(body).unwrap();
        assert_eq!(fields, plain);
    }
}
