//! wardgate: a data-access gateway that makes a political party's data protection promises
//! executable.
//!
//! It sits in front of the voter file and the membership database. On every request it
//! authenticates the caller, decides with Cedar policies whether the declared purpose, its
//! lawful basis, the caller's areas and each record's restriction flags allow it, forwards the
//! query (narrowed to the caller's areas), drops records and strips fields the purpose may not
//! see, and releases the answer only once a tamper-evident audit record of exactly what was
//! disclosed is durable.
//!
//! Modules in request-path order (the README's Architecture section has the diagram):
//! - [`config`]: the TOML file, parsed once into typed values.
//! - [`startup`]: load and check everything, then run the listeners.
//! - [`server`]: listeners, TLS, graceful shutdown; [`connection`]: one connection's requests
//!   under way and its idle close; [`server_cert`]: the certificate it offers;
//!   [`client_addr`]: the client behind a trusted load balancer.
//! - [`request_head`]: how large a request's line and headers may be; [`unread_head`]: a head
//!   hyper could not read, answered as a problem document.
//! - [`gateway`]: the pipeline: authenticate, route, purpose, authorize, forward, filter, audit.
//! - [`auth`]: bearer JWT to [`auth::Principal`].
//! - [`controls`]: the rights register and revocations, shared across replicas through Redis.
//! - [`bulk`]: how many exports and aggregates each caller has under way.
//! - [`routes`]: the only paths and query parameters that may reach a datastore.
//! - [`catalog`]: the information asset register and purpose catalogue.
//! - [`geography`]: the area DAG.
//! - [`policy`]: Cedar, loaded and validated at start.
//! - [`decisions`]: record decisions memoised per distinct attribute combination.
//! - [`dialect`]: how each kind of datastore is asked (wardgate's API, Datasette).
//! - [`writes`]: what a write body may carry.
//! - [`proxy`]: the upstream client; [`connector`]: its connections, TCP or TLS to `https://`
//!   datastores, within one deadline.
//! - [`filter`]: row and field filtering over raw JSON; [`uk_time`]: the UK's date and
//!   summer time, which ages, TPS checks and working hours are judged in.
//! - [`export`]: streamed exports, filtered line by line and audited chunk by chunk.
//! - [`audit`]: the durable, hash-chained access log.
//! - [`error`]: the request path's one error type and its mapping to problem+json.
//! - [`admin`]: health, readiness, metrics; [`rights`]: the rights register and revocation endpoints.
//! - [`sar`]: the subject access report, from the log's subject index.
//! - [`watch`]: breach detection over the audit stream, the breach log, the live feed and the
//!   security console.
//! - [`rekey`]: `SIGHUP`, and a change to their files: token keys, the server's certificate,
//!   datastores' TLS files and the policy pack read again.
//! - [`token`], [`demo`]: minting tokens and the embedded demo.

pub mod admin;
pub mod aggregate;
pub mod audit;
pub mod auth;
pub mod bulk;
pub mod catalog;
pub mod client_addr;
pub mod config;
pub mod connection;
pub mod connector;
pub mod controls;
pub mod decisions;
pub mod demo;
pub mod dialect;
pub mod error;
pub mod export;
pub mod filter;
pub mod gateway;
pub mod geography;
pub mod policy;
pub mod proxy;
pub mod rekey;
pub mod request_head;
pub mod rights;
pub mod routes;
pub mod sar;
pub mod server;
pub mod server_cert;
pub mod startup;
#[cfg(test)]
pub(crate) mod test_log;
pub mod token;
pub mod uk_time;
pub mod unread_head;
pub mod watch;
pub mod writes;
