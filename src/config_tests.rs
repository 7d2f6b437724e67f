//! Configuration parsing: typed at the edge, unknown keys and bad values named.

use super::*;

const MINIMAL: &str = r#"
[server]
listen = "127.0.0.1:8443"
data_dir = "/var/lib/wardgate"
[server.tls]
cert_file = "tls/cert.pem"
key_file = "tls/key.pem"
[auth]
issuers = ["https://sso.example"]
audience = "wardgate"
algorithms = ["ES256"]
[[auth.keys]]
kid = "k1"
algorithm = "ES256"
public_key_file = "keys/k1.pem"
[policy]
dir = "policies"
[catalog]
file = "catalog.toml"
[geography]
file = "areas.toml"
[audit]
durability = "fsync"
[datasets.voter]
upstream = "http://127.0.0.1:7001"
"#;

fn parse(text: &str) -> anyhow::Result<Config> {
    Config::parse(text, Path::new("/etc/wardgate"))
}

fn err(text: &str) -> String {
    format!("{:#}", parse(text).unwrap_err())
}

#[test]
fn defaults_and_relative_paths() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:9901");
    assert_eq!(c.policy_dir, Path::new("/etc/wardgate/policies"));
    assert_eq!(c.audit.dir, Path::new("/var/lib/wardgate/audit"));
    assert_eq!(c.auth.leeway, Duration::from_secs(30));
    assert_eq!(c.auth.max_token_lifetime, Duration::from_secs(86_400));
    let long = MINIMAL.replace("[auth]\n", "[auth]\nmax_token_lifetime = \"10years\"\n");
    assert!(
        err(&long).contains("auth.max_token_lifetime"),
        "{}",
        err(&long)
    );
    assert_eq!(
        c.datasets["voter"].response_timeout,
        Duration::from_secs(15)
    );
    assert!(c.server.tls.is_some());
    assert_eq!(c.audit.commit_window, Duration::from_millis(3));
    assert_eq!(c.datasets["voter"].idle_connections, 1024);
}

#[test]
fn aggregate_cells_of_one_are_refused() {
    let d = parse(MINIMAL).unwrap().aggregates;
    assert_eq!((d.min_cell, d.max_groups, d.round_to), (10, 10_000, 5));
    let with = |t: &str| format!("{MINIMAL}\n[aggregates]\n{t}\n");
    let c = parse(&with("min_cell = 5\nmax_groups = 50")).unwrap();
    assert_eq!((c.aggregates.min_cell, c.aggregates.max_groups), (5, 50));
    for bad in ["min_cell = 1", "min_cell = 0"] {
        assert!(err(&with(bad)).contains("`aggregates.min_cell`"), "{bad}");
    }
    assert!(err(&with("max_groups = 0")).contains("`aggregates.max_groups`"));
    assert!(err(&with("round_to = 0")).contains("`aggregates.round_to`"));
    assert!(err(&with("min_cell = 4\nround_to = 5")).contains("`aggregates.round_to` is 5"));
    // Counts are rounded down: a threshold between two steps would narrow its cells.
    for (bad, then) in [
        ("min_cell = 12", "(12)"),
        ("min_cell = 10\nround_to = 3", "(10)"),
    ] {
        let e = err(&with(bad));
        assert!(
            e.contains(then) && e.contains("must be a multiple"),
            "{bad}: {e}"
        );
    }
    let c = parse(&with("min_cell = 12\nround_to = 4")).unwrap();
    assert_eq!((c.aggregates.min_cell, c.aggregates.round_to), (12, 4));
    assert!(err(&with("min_cells = 5")).contains("min_cells"));
}

#[test]
fn idle_connections_are_at_least_one() {
    let with = |n: &str| MINIMAL.replace("7001\"", &format!("7001\"\nidle_connections = {n}"));
    assert_eq!(
        parse(&with("8")).unwrap().datasets["voter"].idle_connections,
        8
    );
    assert!(err(&with("0")).contains("datasets.voter.idle_connections"));
    assert!(err(&with("-1")).contains("idle_connections"));
}

#[test]
fn max_connections_is_bounded() {
    assert_eq!(parse(MINIMAL).unwrap().server.max_connections, 4096);
    let with = |n: &str| {
        MINIMAL.replace(
            "data_dir = \"/var/lib/wardgate\"\n",
            &format!("data_dir = \"/var/lib/wardgate\"\nmax_connections = {n}\n"),
        )
    };
    assert_eq!(parse(&with("3")).unwrap().server.max_connections, 3);
    for refused in ["0", "1000001"] {
        let e = err(&with(refused));
        assert!(e.contains("`server.max_connections`"), "{e}");
    }
}

#[test]
fn bulk_reads_per_caller_are_bounded() {
    assert_eq!(parse(MINIMAL).unwrap().server.max_bulk_reads_per_caller, 2);
    let with = |n: &str| {
        MINIMAL.replace(
            "data_dir = \"/var/lib/wardgate\"\n",
            &format!("data_dir = \"/var/lib/wardgate\"\nmax_bulk_reads_per_caller = {n}\n"),
        )
    };
    assert_eq!(
        parse(&with("5")).unwrap().server.max_bulk_reads_per_caller,
        5
    );
    for refused in ["0", "65"] {
        let e = err(&with(refused));
        assert!(e.contains("`server.max_bulk_reads_per_caller`"), "{e}");
    }
}

#[test]
fn files_are_checked_for_changes_every_30s_unless_the_file_says_otherwise() {
    assert_eq!(
        parse(MINIMAL).unwrap().server.file_check_interval,
        Some(Duration::from_secs(30))
    );
    let with = |v: &str| {
        MINIMAL.replace(
            "data_dir = \"/var/lib/wardgate\"\n",
            &format!("data_dir = \"/var/lib/wardgate\"\nfile_check_interval = \"{v}\"\n"),
        )
    };
    assert_eq!(
        parse(&with("off")).unwrap().server.file_check_interval,
        None
    );
    assert_eq!(
        parse(&with("5s")).unwrap().server.file_check_interval,
        Some(Duration::from_secs(5))
    );
    for refused in ["0s", "10ms", "2days", "never", ""] {
        let e = err(&with(refused));
        assert!(e.contains("`server.file_check_interval`"), "{refused}: {e}");
    }
}

#[test]
fn the_commit_window_is_bounded() {
    let with = |w: &str| {
        MINIMAL.replace(
            r#"durability = "fsync""#,
            &format!("durability = \"fsync\"\ncommit_window = \"{w}\""),
        )
    };
    assert_eq!(
        parse(&with("0s")).unwrap().audit.commit_window,
        Duration::ZERO
    );
    assert_eq!(
        parse(&with("250us")).unwrap().audit.commit_window,
        Duration::from_micros(250)
    );
    assert!(err(&with("2s")).contains("at most 100ms"));
    assert!(err(&with("soon")).contains("audit.commit_window"));
}

#[test]
fn a_witness_needs_a_redis_url_a_key_and_a_sane_interval() {
    let with = |body: &str| {
        MINIMAL.replace(
            "[datasets.voter]",
            &format!("[audit.witness]\n{body}\n[datasets.voter]"),
        )
    };
    assert!(parse(MINIMAL).unwrap().audit.witness.is_none());
    let w = parse(&with(
        r#"url = "redis://w:pw@witness:6380"
key = "wardgate:audit-heads:a""#,
    ))
    .unwrap()
    .audit
    .witness
    .unwrap();
    assert_eq!(
        (w.key.as_str(), w.interval),
        ("wardgate:audit-heads:a", Duration::from_secs(10))
    );
    for url in ["http://witness", "rediss://witness"] {
        let e = err(&with(&format!("url = \"{url}\"\nkey = \"k\"")));
        assert!(e.contains("audit.witness.url"), "{url}: {e}");
        if url.starts_with("rediss") {
            assert!(e.contains("without TLS"), "{e}");
        }
    }
    let e = err(&with(
        r#"url = "redis://witness"
key = " ""#,
    ));
    assert!(e.contains("audit.witness.key"), "{e}");
    for interval in ["10ms", "2h", "soon"] {
        let e = err(&with(&format!(
            "url = \"redis://witness\"\nkey = \"k\"\ninterval = \"{interval}\""
        )));
        assert!(e.contains("audit.witness.interval"), "{interval}: {e}");
    }
    assert!(err(&with(r#"url = "redis://witness""#)).contains("key"));
}

/// A datastore's credential file must hold one: an empty one was sent as an empty
/// `Authorization`, and every request came back 502 with nothing at start to say why.
#[test]
fn an_empty_authorization_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (empty, token) = (dir.path().join("empty"), dir.path().join("token"));
    std::fs::write(&empty, " \n").unwrap();
    std::fs::write(&token, "Bearer s3cret\n").unwrap();
    let with = |file: &Path| {
        MINIMAL.replace(
            "upstream = \"http://127.0.0.1:7001\"",
            &format!(
                "upstream = \"http://127.0.0.1:7001\"\nauthorization_file = \"{}\"",
                file.display()
            ),
        )
    };
    let e = err(&with(&empty));
    assert!(
        e.contains("datasets.voter.authorization_file") && e.contains("is empty"),
        "{e}"
    );
    let c = parse(&with(&token)).unwrap();
    assert_eq!(
        c.datasets["voter"].authorization.as_deref(),
        Some("Bearer s3cret")
    );
}

#[test]
fn unknown_keys_are_named() {
    assert!(err(&MINIMAL.replace("durability", "durabilty")).contains("durabilty"));
    assert!(err(&format!("{MINIMAL}\n[surprise]\nx = 1\n")).contains("surprise"));
}

#[test]
fn bad_values_are_named() {
    assert!(err(&MINIMAL.replace("127.0.0.1:8443", "localhost")).contains("server.listen"));
    assert!(
        err(&MINIMAL.replace("http://127.0.0.1:7001", "ftp://x"))
            .contains("datasets.voter.upstream")
    );
    assert!(err(&MINIMAL.replace("[auth]", "[auth]\nleeway = \"1h\"")).contains("auth.leeway"));
    assert!(
        err(&MINIMAL.replace("algorithms = [\"ES256\"]", "algorithms = [\"HS256\"]"))
            .contains("HS256")
    );
    assert!(err(&MINIMAL.replace("\"fsync\"", "\"sometimes\"")).contains("sometimes"));
}

#[test]
fn tls_is_required_unless_plaintext_is_explicit() {
    let no_tls = MINIMAL.replace(
        "[server.tls]\ncert_file = \"tls/cert.pem\"\nkey_file = \"tls/key.pem\"\n",
        "",
    );
    assert!(err(&no_tls).contains("server.tls"));
    let plain = no_tls.replace(
        "data_dir = \"/var/lib/wardgate\"",
        "data_dir = \"/var/lib/wardgate\"\nplaintext = true",
    );
    assert!(parse(&plain).unwrap().server.tls.is_none());
    let both = MINIMAL.replace(
        "data_dir = \"/var/lib/wardgate\"",
        "data_dir = \"/var/lib/wardgate\"\nplaintext = true",
    );
    assert!(err(&both).contains("contradict"));
}

/// Trusted proxies are addresses or networks; anything else is named.
#[test]
fn trusted_proxies_are_networks() {
    let with = |list: &str| {
        MINIMAL.replace(
            "data_dir = \"/var/lib/wardgate\"",
            &format!("data_dir = \"/var/lib/wardgate\"\ntrusted_proxies = {list}"),
        )
    };
    let c = parse(&with(r#"["10.0.4.0/24", "192.0.2.7", "fd00::/8"]"#)).unwrap();
    let lb: std::net::SocketAddr = "10.0.4.9:1234".parse().unwrap();
    let mut h = http::HeaderMap::new();
    h.insert("x-forwarded-for", "203.0.113.5".parse().unwrap());
    assert_eq!(
        c.server.trusted_proxies.client(lb, &h).to_string(),
        "203.0.113.5:0"
    );
    for bad in [r#"["lb.internal"]"#, r#"["10.0.4.1/24"]"#] {
        let e = err(&with(bad));
        assert!(e.contains("server.trusted_proxies"), "{e}");
    }
    let plain = parse(MINIMAL).unwrap();
    assert_eq!(plain.server.trusted_proxies.client(lb, &h), lb);
}

/// The admin plane speaks plain HTTP, so off loopback it needs saying so on purpose.
#[test]
fn the_admin_plane_stays_on_loopback_unless_told() {
    let at = |addr: &str, extra: &str| {
        MINIMAL.replace(
            "data_dir = \"/var/lib/wardgate\"",
            &format!("data_dir = \"/var/lib/wardgate\"\nadmin_listen = \"{addr}\"{extra}"),
        )
    };
    for addr in ["0.0.0.0:9901", "10.1.2.3:9901", "[::]:9901"] {
        let e = err(&at(addr, ""));
        assert!(
            e.contains("server.admin_listen") && e.contains("admin_plaintext_off_loopback"),
            "{e}"
        );
        let told = at(addr, "\nadmin_plaintext_off_loopback = true");
        assert_eq!(parse(&told).unwrap().server.admin_listen.to_string(), addr);
    }
    for addr in ["127.0.0.1:9901", "[::1]:9901"] {
        assert!(parse(&at(addr, "")).is_ok(), "{addr}");
    }
}

#[test]
fn a_key_must_use_an_allowed_algorithm() {
    let text = MINIMAL.replace("algorithm = \"ES256\"", "algorithm = \"RS256\"");
    assert!(err(&text).contains("k1"));
    // One no algorithm allows names its key too.
    let text = MINIMAL.replace("algorithm = \"ES256\"", "algorithm = \"HS256\"");
    let e = err(&text);
    assert!(
        e.contains("`auth.keys.algorithm` of key `k1`: `HS256` is not allowed"),
        "{e}"
    );
}

#[test]
fn the_audience_must_name_the_gateway() {
    for blank in ["", "  "] {
        let e = err(&MINIMAL.replace(
            "audience = \"wardgate\"",
            &format!("audience = \"{blank}\""),
        ));
        assert!(e.contains("`auth.audience` is empty"), "{e}");
    }
}

#[test]
fn issuer_roles_name_trusted_issuers_and_some_role() {
    let with = |t: &str| {
        MINIMAL.replace(
            r#"issuers = ["https://sso.example"]"#,
            &format!("issuers = [\"https://sso.example\"]\nissuer_roles = {t}"),
        )
    };
    let c = parse(&with(r#"{ "https://sso.example" = ["canvasser"] }"#)).unwrap();
    assert_eq!(c.auth.issuer_roles["https://sso.example"], ["canvasser"]);
    assert!(parse(MINIMAL).unwrap().auth.issuer_roles.is_empty());
    let e = err(&with(r#"{ "https://elsewhere" = ["canvasser"] }"#));
    assert!(
        e.contains("`https://elsewhere`, which `auth.issuers` does not list"),
        "{e}"
    );
    let e = err(&with(r#"{ "https://sso.example" = [] }"#));
    assert!(e.contains("gives `https://sso.example` no role"), "{e}");
}

#[test]
fn each_key_answers_for_one_trusted_issuer() {
    // One trusted issuer: a key that names none answers for it.
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.auth.keys[0].issuer, "https://sso.example");

    // A blank issuer would let a token name none.
    let e = err(&MINIMAL.replace(
        r#"issuers = ["https://sso.example"]"#,
        r#"issuers = ["https://sso.example", " "]"#,
    ));
    assert!(e.contains("`auth.issuers` has a blank entry"), "{e}");

    // Two: a key must say which, and it must be one of them.
    let two = MINIMAL.replace(
        r#"issuers = ["https://sso.example"]"#,
        r#"issuers = ["https://sso.example", "https://partner.example"]
subject_prefixes = { "https://partner.example" = "partner:" }"#,
    );
    let e = err(&two);
    assert!(
        e.contains("key `k1` names no issuer") && e.contains("lists 2"),
        "{e}"
    );
    let named = |i: &str| two.replace("keys/k1.pem\"", &format!("keys/k1.pem\"\nissuer = \"{i}\""));
    let c = parse(&named("https://partner.example")).unwrap();
    assert_eq!(c.auth.keys[0].issuer, "https://partner.example");
    let e = err(&named("https://elsewhere.example"));
    assert!(
        e.contains(
            "key `k1` names issuer `https://elsewhere.example`, which `auth.issuers` does not list"
        ),
        "{e}"
    );

    // The JWKS file's keys likewise, and `jwks_issuer` means nothing without the file.
    let e = err(&named("https://partner.example").replace(
        "[[auth.keys]]",
        "jwks_file = \"keys/jwks.json\"\n[[auth.keys]]",
    ));
    assert!(e.contains("`auth.jwks_file` names no issuer"), "{e}");
    let c = parse(&named("https://partner.example").replace(
        "[[auth.keys]]",
        "jwks_file = \"keys/jwks.json\"\njwks_issuer = \"https://sso.example\"\n[[auth.keys]]",
    ))
    .unwrap();
    assert_eq!(c.auth.jwks_issuer, "https://sso.example");
    let e = err(&MINIMAL.replace(
        "[[auth.keys]]",
        "jwks_issuer = \"https://sso.example\"\n[[auth.keys]]",
    ));
    assert!(
        e.contains("`auth.jwks_issuer` is set but neither `auth.jwks_file` nor `auth.jwks_url` is"),
        "{e}"
    );
}

#[test]
fn a_jwks_url_is_https_with_its_roots_and_sane_intervals() {
    let with = |lines: &str| MINIMAL.replace("[[auth.keys]]", &format!("{lines}\n[[auth.keys]]"));
    let url = "jwks_url = \"https://sso.example/.well-known/jwks.json\"";
    let ca = "jwks_ca_file = \"/etc/ssl/certs/ca-certificates.crt\"";
    let c = parse(&with(&format!("{url}\n{ca}"))).unwrap();
    let j = c.auth.jwks_url.unwrap();
    assert_eq!(j.url.host(), Some("sso.example"));
    assert_eq!(j.ca_file, Path::new("/etc/ssl/certs/ca-certificates.crt"));
    assert_eq!(j.refresh, Duration::from_secs(300));
    assert_eq!(j.max_stale, Duration::from_secs(86_400));
    assert_eq!(c.auth.jwks_issuer, "https://sso.example");
    // Relative to the configuration's directory, as every other file.
    let c = parse(&with(&format!(
        "{url}\njwks_ca_file = \"tls/idp-ca.pem\"\njwks_refresh = \"30s\"\njwks_max_stale = \"1h\""
    )))
    .unwrap();
    let j = c.auth.jwks_url.unwrap();
    assert_eq!(j.ca_file, Path::new("/etc/wardgate/tls/idp-ca.pem"));
    assert_eq!(
        (j.refresh, j.max_stale),
        (Duration::from_secs(30), Duration::from_secs(3600))
    );

    for (lines, says) in [
        (
            format!("jwks_url = \"http://sso.example/jwks\"\n{ca}"),
            "only `https://` is fetched",
        ),
        (
            format!("jwks_url = \"https://user:S3cret@sso.example/jwks\"\n{ca}"),
            "holds a user name or password",
        ),
        (
            format!("jwks_url = \"http://user:S3cret@sso.example/jwks\"\n{ca}"),
            "only `https://` is fetched",
        ),
        (format!("jwks_url = \"/jwks\"\n{ca}"), "only `https://`"),
        (
            format!("jwks_url = \"https://sso example\"\n{ca}"),
            "is not a URL",
        ),
        (url.to_owned(), "`auth.jwks_ca_file` is not"),
        (
            format!("{url}\n{ca}\njwks_refresh = \"500ms\""),
            "`auth.jwks_refresh`",
        ),
        (
            format!("{url}\n{ca}\njwks_refresh = \"2d\""),
            "at most 1day",
        ),
        (
            format!("{url}\n{ca}\njwks_refresh = \"1h\"\njwks_max_stale = \"1h\""),
            "must be longer than `auth.jwks_refresh`",
        ),
        (
            format!("{url}\n{ca}\njwks_max_stale = \"60d\""),
            "`auth.jwks_max_stale`",
        ),
        (
            ca.to_owned(),
            "`auth.jwks_ca_file` is set but `auth.jwks_url` is not",
        ),
        (
            "jwks_refresh = \"1m\"".to_owned(),
            "`auth.jwks_refresh` is set but `auth.jwks_url` is not",
        ),
        (
            format!("{url}\n{ca}\njwks_file = \"keys/jwks.json\""),
            "both set: give one",
        ),
    ] {
        let e = err(&with(&lines));
        assert!(e.contains(says), "{lines}: {e}");
        assert!(!e.contains("S3cret"), "the password is shown: {e}");
    }
    // The URL alone is keys enough.
    let only = MINIMAL.replace(
        "[[auth.keys]]\nkid = \"k1\"\nalgorithm = \"ES256\"\npublic_key_file = \"keys/k1.pem\"",
        &format!("{url}\n{ca}"),
    );
    assert!(parse(&only).unwrap().auth.keys.is_empty());
    let none = MINIMAL.replace(
        "[[auth.keys]]\nkid = \"k1\"\nalgorithm = \"ES256\"\npublic_key_file = \"keys/k1.pem\"",
        "",
    );
    assert!(err(&none).contains("give `auth.keys`, `auth.jwks_file` or `auth.jwks_url`"));
}

#[test]
fn subject_prefixes_keep_issuers_apart() {
    let with = |issuers: &str, prefixes: &str| {
        MINIMAL
            .replace(
                r#"issuers = ["https://sso.example"]"#,
                &format!("issuers = {issuers}\nsubject_prefixes = {prefixes}"),
            )
            .replace(
                "keys/k1.pem\"",
                "keys/k1.pem\"\nissuer = \"https://sso.example\"",
            )
    };
    let two = r#"["https://sso.example", "https://partner.example"]"#;
    let c = parse(&with(two, r#"{ "https://partner.example" = "partner:" }"#)).unwrap();
    assert_eq!(
        c.auth.subject_prefixes["https://partner.example"],
        "partner:"
    );
    assert!(parse(MINIMAL).unwrap().auth.subject_prefixes.is_empty());
    // Two issuers naming subjects bare would share them.
    let e = err(&with(two, "{}"));
    assert!(
        e.contains(
            "`https://sso.example`, `https://partner.example` have no `auth.subject_prefixes`"
        ),
        "{e}"
    );
    // Unless the configuration says so, with an empty prefix.
    let c = parse(&with(two, r#"{ "https://partner.example" = "" }"#)).unwrap();
    assert_eq!(c.auth.subject_prefixes["https://partner.example"], "");
    // A prefix beginning another's would let their subjects meet.
    let three = r#"["https://sso.example", "https://partner.example", "https://other.example"]"#;
    let e = err(&with(
        three,
        r#"{ "https://partner.example" = "p:", "https://other.example" = "p:x:" }"#,
    ));
    assert!(
        e.contains(
            "`https://other.example`'s prefix `p:x:` begins with `https://partner.example`'s `p:`"
        ),
        "{e}"
    );
    let e = err(&with(
        three,
        r#"{ "https://partner.example" = "p:", "https://other.example" = "p:" }"#,
    ));
    assert!(e.contains("begins with"), "{e}");
    let e = err(&with(two, r#"{ "https://elsewhere" = "e:" }"#));
    assert!(
        e.contains("`https://elsewhere`, which `auth.issuers` does not list"),
        "{e}"
    );
    let e = err(&with(two, r#"{ "https://partner.example" = "partner :" }"#));
    assert!(e.contains("without spaces"), "{e}");
    // Without a separator, `p` would take every bare subject beginning with p.
    for bare in ["p", "p_", "p-", "p."] {
        let e = err(&with(
            two,
            &format!(r#"{{ "https://partner.example" = "{bare}" }}"#),
        ));
        assert!(e.contains("end in `:`, `/`, `|` or `#`"), "{e}");
    }
    // The gateway's own operators are `local:`.
    for local in ["local:", "local:x:", "l:"] {
        let e = parse(&with(
            two,
            &format!(r#"{{ "https://partner.example" = "{local}" }}"#),
        ));
        assert_eq!(e.is_err(), local != "l:", "{local}: {:?}", e.as_ref().err());
    }
}

/// Values that parse but would break the gateway, or the log's promises, are refused with
/// the key named: `6m` is six minutes to humantime (months are `6M`), and a prune with that
/// retention would delete what a subject access request needs.
#[test]
fn durations_and_sizes_that_would_break_the_gateway_are_refused() {
    let in_section =
        |anchor: &str, line: &str| MINIMAL.replace(anchor, &format!("{anchor}\n{line}"));
    let audit = "durability = \"fsync\"";
    let server = "data_dir = \"/var/lib/wardgate\"";
    let voter = "upstream = \"http://127.0.0.1:7001\"";
    for (anchor, line, key) in [
        (audit, "retention = \"6m\"", "audit.retention"),
        (audit, "retention = \"0s\"", "audit.retention"),
        (audit, "retention = \"30days\"", "audit.retention"),
        (
            audit,
            "client_addr_retention = \"0s\"",
            "audit.client_addr_retention",
        ),
        (audit, "prune_interval = \"0s\"", "audit.prune_interval"),
        (audit, "segment_max_bytes = 0", "audit.segment_max_bytes"),
        (server, "max_request_bytes = 0", "server.max_request_bytes"),
        (
            server,
            "max_response_bytes = 100",
            "server.max_response_bytes",
        ),
        (
            voter,
            "connect_timeout = \"0s\"",
            "datasets.voter.connect_timeout",
        ),
        (
            voter,
            "response_timeout = \"0s\"",
            "datasets.voter.response_timeout",
        ),
    ] {
        let e = err(&in_section(anchor, line));
        assert!(e.contains(key) && e.contains("at least"), "{line}: {e}");
    }
    for (anchor, line, key, says) in [
        (
            server,
            "shutdown_grace = \"300000000000years\"",
            "server.shutdown_grace",
            "at most",
        ),
        (
            audit,
            "retention = \"2000000years\"",
            "audit.retention",
            "at most",
        ),
        (
            audit,
            "client_addr_retention = \"2000000years\"",
            "audit.client_addr_retention",
            "at most",
        ),
        (audit, "max_batch = 0", "audit.max_batch", "1 to 65536"),
        (audit, "max_batch = 65537", "audit.max_batch", "1 to 65536"),
    ] {
        let e = err(&in_section(anchor, line));
        assert!(e.contains(key) && e.contains(says), "{line}: {e}");
    }
    let redis = |line: &str| {
        format!("{MINIMAL}\n[redis]\nurl = \"redis://127.0.0.1:6379\"\nkey_file = \"k\"\n{line}\n")
    };
    for (line, key) in [
        ("staleness_bound = \"0s\"", "redis.staleness_bound"),
        ("resync_interval = \"0s\"", "redis.resync_interval"),
    ] {
        let e = err(&redis(line));
        assert!(e.contains(key) && e.contains("at least"), "{line}: {e}");
    }
    // The shortest each allows still loads (and the longest retention, as documented).
    for (anchor, line) in [
        (audit, "retention = \"31days\""),
        (audit, "retention = \"7years\""),
        (audit, "retention = \"100years\""),
        (audit, "client_addr_retention = \"100years\""),
        (audit, "prune_interval = \"1m\""),
        (
            voter,
            "connect_timeout = \"10ms\"\nresponse_timeout = \"11ms\"",
        ),
        (server, "max_request_bytes = 1024"),
    ] {
        parse(&in_section(anchor, line)).unwrap();
    }
    parse(&redis("staleness_bound = \"1s\"\nresync_interval = \"1s\"")).unwrap();
    // A bound under a second refuses requests with Redis well; one past ten minutes is not
    // failing closed; a resynchronisation interval is at most an hour.
    for (line, key, says) in [
        (
            "staleness_bound = \"500ms\"",
            "redis.staleness_bound",
            "at least",
        ),
        (
            "staleness_bound = \"1year\"",
            "redis.staleness_bound",
            "at most",
        ),
        (
            "resync_interval = \"300000000000years\"",
            "redis.resync_interval",
            "",
        ),
        (
            "resync_interval = \"2h\"",
            "redis.resync_interval",
            "at most",
        ),
    ] {
        let e = err(&redis(line));
        assert!(e.contains(key) && e.contains(says), "{line}: {e}");
    }
    parse(&redis(
        "staleness_bound = \"10m\"\nresync_interval = \"1h\"",
    ))
    .unwrap();
}

/// `redis.url` is checked where the configuration is read (so `validate` catches it), and the
/// message never shows the URL, which may hold a password.
#[test]
fn a_redis_url_is_checked_at_once_and_never_shown() {
    let with_url = |url: &str| format!("{MINIMAL}\n[redis]\nurl = \"{url}\"\nkey_file = \"k\"\n");
    for url in [
        "rediss://wardgate:s3cret@redis.internal:6380",
        "redis//wardgate:s3cret@redis.internal",
    ] {
        let e = err(&with_url(url));
        assert!(e.contains("redis.url"), "{url}: {e}");
        assert!(!e.contains("s3cret"), "{url}: {e}");
    }
    parse(&with_url("redis://wardgate:s3cret@redis.internal:6379")).unwrap();
}

/// Two uses of one stream, and quotas no role could live within, are refused.
#[test]
fn quotas_and_streams_that_cannot_work_are_refused() {
    let e = err(&format!(
        "{MINIMAL}\n[redis]\nurl = \"redis://127.0.0.1\"\nkey_file = \"k\"\nstream = \"s\"\n\
         [watch]\nshared_stream = \"s\"\n"
    ));
    assert!(
        e.contains("redis.stream") && e.contains("watch.shared_stream"),
        "{e}"
    );
    for (hour, day) in [(0, 10), (100, 50)] {
        let e = err(&format!(
            "{MINIMAL}\n[quotas.canvasser]\nper_hour = {hour}\nper_day = {day}\n"
        ));
        assert!(e.contains("quotas.canvasser"), "{hour}/{day}: {e}");
    }
    parse(&format!(
        "{MINIMAL}\n[quotas.canvasser]\nper_hour = 100\nper_day = 100\n"
    ))
    .unwrap();
}

/// The gateway appends each route's path and query to a datastore's URL: a query of its own
/// would send the datastore a resource no route chose, and credentials belong in a file.
#[test]
fn an_upstream_url_is_a_plain_base() {
    for url in [
        "http://127.0.0.1:7001/?k=v",
        "http://127.0.0.1:7001/#x",
        "http://user:S3cret@127.0.0.1:7001",
        "https://127.0.0.1:7001",
        // Refused first for its missing `ca_file`, then for a query: the secret is shown in
        // neither.
        "https://svc:S3cret@store.internal",
        "http://svc:S3cret@store.internal/?k=v",
        "ftp://svc:S3cret@store.internal",
        // A password with `/` or `?` in it (not a valid URL: read as a port that is not a
        // number), and a token in a query.
        "http://svc:pa/S3cret@store.internal",
        "http://store.internal:80x",
        "http://svc:pa?S3cret@store.internal",
        "http://store.internal/?api_key=S3cret",
    ] {
        let e = err(&MINIMAL.replace("http://127.0.0.1:7001", url));
        assert!(e.contains("datasets.voter.upstream"), "{url}: {e}");
        assert!(!e.contains("S3cret"), "{url}: the password is shown: {e}");
    }
    parse(&MINIMAL.replace("http://127.0.0.1:7001", "http://127.0.0.1:7001/api")).unwrap();
}

#[test]
fn an_https_upstream_names_whom_it_trusts_and_only_https_takes_tls_files() {
    let https = MINIMAL.replace("http://127.0.0.1:7001", "https://store.internal:7001");
    // No implicit roots: an https:// datastore needs its CA named.
    let e = err(&https);
    assert!(
        e.contains("datasets.voter.upstream") && e.contains("`datasets.voter.ca_file`"),
        "{e}"
    );
    let with = |t: &str| https.replace("[datasets.voter]\n", &format!("[datasets.voter]\n{t}\n"));
    let c = parse(&with("ca_file = \"tls/store-ca.pem\"")).unwrap();
    let tls = c.datasets["voter"].tls.as_ref().unwrap();
    assert_eq!(tls.ca_file, Path::new("/etc/wardgate/tls/store-ca.pem"));
    assert!(tls.client_cert.is_none());
    let c = parse(&with(
        "ca_file = \"ca.pem\"\nclient_cert_file = \"gw.pem\"\nclient_key_file = \"/k/gw.key\"",
    ))
    .unwrap();
    let tls = c.datasets["voter"].tls.as_ref().unwrap();
    assert_eq!(
        tls.client_cert,
        Some((
            PathBuf::from("/etc/wardgate/gw.pem"),
            PathBuf::from("/k/gw.key")
        ))
    );
    // A certificate without its key, or a key without its certificate.
    for half in [
        "client_cert_file = \"gw.pem\"",
        "client_key_file = \"gw.key\"",
    ] {
        let e = err(&with(&format!("ca_file = \"ca.pem\"\n{half}")));
        assert!(e.contains("go together"), "{half}: {e}");
    }
    // TLS files on a plain http:// datastore would protect nothing: refused, not ignored.
    let plain =
        |t: &str| MINIMAL.replace("[datasets.voter]\n", &format!("[datasets.voter]\n{t}\n"));
    for t in [
        "ca_file = \"ca.pem\"",
        "client_cert_file = \"gw.pem\"\nclient_key_file = \"gw.key\"",
    ] {
        let e = err(&plain(t));
        assert!(e.contains("plain http://"), "{t}: {e}");
    }
    assert!(parse(MINIMAL).unwrap().datasets["voter"].tls.is_none());
}

#[test]
fn a_connect_timeout_must_be_shorter_than_the_response_timeout() {
    let with = |t: &str| MINIMAL.replace("[datasets.voter]\n", &format!("[datasets.voter]\n{t}\n"));
    // The connection is made within the response's deadline: as long, it would never fire.
    for t in [
        "connect_timeout = \"15s\"",
        "connect_timeout = \"2s\"\nresponse_timeout = \"1s\"",
    ] {
        let e = err(&with(t));
        assert!(
            e.contains("`datasets.voter.connect_timeout`")
                && e.contains("must be shorter than `datasets.voter.response_timeout`"),
            "{t}: {e}"
        );
    }
    parse(&with("connect_timeout = \"14s\"")).unwrap();
}

/// Plain HTTP on the data plane off loopback is said to be meant, as the admin plane's is:
/// callers' tokens and the records they read would cross the network in the clear.
#[test]
fn a_plaintext_data_plane_off_loopback_must_be_meant() {
    let plain = |listen: &str, extra: &str| {
        MINIMAL
            .replace(
                "listen = \"127.0.0.1:8443\"",
                &format!("listen = \"{listen}\""),
            )
            .replace(
                "[server.tls]\ncert_file = \"tls/cert.pem\"\nkey_file = \"tls/key.pem\"\n",
                &format!("plaintext = true\n{extra}"),
            )
    };
    for listen in ["0.0.0.0:8443", "[::]:8443", "10.1.2.3:8443"] {
        let e = err(&plain(listen, ""));
        assert!(
            e.contains("server.listen") && e.contains("plaintext_off_loopback"),
            "{listen}: {e}"
        );
        parse(&plain(listen, "plaintext_off_loopback = true\n")).unwrap();
    }
    for listen in ["127.0.0.1:8443", "[::1]:8443"] {
        parse(&plain(listen, "")).unwrap();
    }
}

/// A secret key file other accounts can read is said in the server log, naming the file, the
/// setting and the mode; one that is its owner's alone is not.
#[test]
fn a_secret_key_file_others_can_read_is_warned_of() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("controls.key");
    std::fs::write(&key, "x".repeat(64)).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (guard, logs) = crate::test_log::capture();
    assert_eq!(warn_if_others_may_read(&key, "redis.key_file"), Some(0o644));
    let text = logs.text();
    assert!(
        text.contains("controls.key") && text.contains("redis.key_file") && text.contains("644"),
        "{text}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(warn_if_others_may_read(&key, "redis.key_file"), None);
    drop(guard);
}
