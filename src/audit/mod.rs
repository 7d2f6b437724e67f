//! The access log behind "no audit, no data": a hash-chained, append-only JSON-lines log that a
//! response carrying personal data waits on before it leaves the gateway.
//!
//! Owns: the record schema and its hash-chained line encoding ([`record`], its JSON written
//! directly by the private `json` module), the on-disk layout
//! (segment files `seg-NNNNNNNN.jsonl` in one directory, one record per line, each line carrying
//! `seq`, `prev` and `hash`; private `segment` module), the group-committing writer with its
//! durability and failure handling ([`writer`]), sealing finished segments with a subject index
//! ([`index`]) on a low-priority thread (private `seal_queue` module), finding one subject's
//! records ([`reader`]), retention ([`prune`]), offline chain verification ([`verify`]), the
//! chain head kept off the host ([`witness`]) and following the log in a terminal ([`tail`]).
//!
//! Does not own: deciding what to record or when a request must wait for it (the request
//! pipeline does), mapping [`AuditError`] to a 503, readiness endpoints, configuration parsing,
//! or what a subject access report says (`sar.rs`).

pub mod addr;
pub mod index;
mod json;
mod prepare;
pub mod prune;
pub mod reader;
pub mod record;
mod seal_queue;
pub(crate) mod segment;
pub mod tail;
pub mod verify;
pub mod witness;
pub mod writer;

pub use record::{AuditRecord, Caller, Decision, FieldsBySubject, OtherFields, RecordKind};
pub use verify::{VerifyError, VerifyReport, verify_against, verify_dir};
pub use writer::{
    Ack, AuditError, AuditLog, AuditSettings, ChainHead, Durability, Logged, Room, STALLED_AFTER,
    within,
};
