//! Route table tests: only declared paths, only declared parameters, nothing that widens.

use super::*;

fn catalog() -> Catalog {
    Catalog::parse(include_str!("../config/catalog.toml")).unwrap()
}

fn get(path: &str, query: Option<&str>) -> Result<Route, GatewayError> {
    resolve(&catalog(), &http::Method::GET, path, query)
}

#[test]
fn declared_routes_resolve() {
    let r = get("/voter/electors", Some("ward=E05011391&page=2&per_page=50")).unwrap();
    assert_eq!(r.kind, RouteKind::List);
    assert_eq!(r.filters.get("ward").map(String::as_str), Some("E05011391"));
    assert_eq!((r.page, r.per_page), (Some(2), Some(50)));
    assert_eq!(r.id(), "voter.list");
    let r = get("/membership/members/M-000001", None).unwrap();
    assert_eq!(
        r.kind,
        RouteKind::Read {
            id: "M-000001".into()
        }
    );
    let r = resolve(
        &catalog(),
        &http::Method::POST,
        "/voter/electors/VF-0000001/canvass",
        None,
    )
    .unwrap();
    assert_eq!(r.id(), "voter.write.canvass");
    assert_eq!(r.action(), RequestAction::Write);
    // `export` and `aggregate` name routes, never a record: not a write's target either.
    for path in [
        "/voter/electors/export/canvass",
        "/voter/electors/aggregate/canvass",
    ] {
        assert!(matches!(
            resolve(&catalog(), &http::Method::POST, path, None),
            Err(GatewayError::RouteNotFound)
        ));
    }
    let r = get(
        "/voter/electors/aggregate",
        Some("by=ward,voting_intention&ward=E05011391"),
    )
    .unwrap();
    assert_eq!(
        r.kind,
        RouteKind::Aggregate {
            by: vec!["ward".into(), "voting_intention".into()]
        }
    );
    assert_eq!(r.id(), "voter.aggregate");
    assert_eq!(r.action(), RequestAction::Aggregate);
    assert_eq!(r.filters["ward"], "E05011391");
}

#[test]
fn postcodes_with_spaces_decode() {
    let r = get("/voter/electors", Some("postcode=LS15+8AB")).unwrap();
    assert_eq!(r.filters["postcode"], "LS15 8AB");
    let r = get("/voter/electors", Some("postcode=LS15%208AB")).unwrap();
    assert_eq!(r.filters["postcode"], "LS15 8AB");
}

#[test]
fn undeclared_paths_and_methods_are_refused() {
    for p in [
        "/",
        "/voter",
        "/voter/",
        "/voter/members",
        "/nope/electors",
        "/voter/electors/a/b/c",
        "/voter/electors/x/delete",
        "//voter/electors",
        "/voter/electors/%2e%2e",
    ] {
        assert!(
            matches!(get(p, None), Err(GatewayError::RouteNotFound)),
            "{p}"
        );
    }
    assert!(matches!(
        resolve(&catalog(), &http::Method::POST, "/voter/electors", None),
        Err(GatewayError::MethodNotAllowed("GET"))
    ));
    assert!(matches!(
        get("/voter/electors/VF-1/canvass", None),
        Err(GatewayError::MethodNotAllowed("POST"))
    ));
}

#[test]
fn nothing_can_widen_the_query() {
    let bad = [
        "areas=E92000001",
        "fields=email",
        "ward=E05011391&ward=E05013911",
        "ward=E05011391%2CE05013911",
        "ward=E05011391%26areas%3DE92000001",
        "ward=%00",
        "ward=E05011391;E05013911",
        "ward=*",
        "ward=",
        "postcode=../../etc",
        "page=0",
        "page=-1",
        "per_page=1001",
        "per_page=10&per_page=20",
        "ward[$ne]=x",
        "ward__in=a",
        "%77ard=E05011391&ward=E05013911",
        "ward=%ff",
    ];
    for q in bad {
        assert!(
            matches!(
                get("/voter/electors", Some(q)),
                Err(GatewayError::BadRequest(_))
            ),
            "{q}"
        );
    }
    // A read takes no parameters at all.
    assert!(matches!(
        get("/voter/electors/VF-1", Some("ward=x")),
        Err(GatewayError::BadRequest(_))
    ));
}

#[test]
fn ids_are_plain() {
    assert!(valid_id("VF-0000001"));
    assert!(valid_id("M_1"));
    for bad in ["", "a/b", "a.b", "a b", "..", "a%2f", &"x".repeat(65)] {
        assert!(!valid_id(bad), "{bad}");
    }
    // A subject id names one record: never a collection's route word.
    assert!(subject_id("VF-0000001"));
    for word in ["export", "aggregate", "a/b", ""] {
        assert!(!subject_id(word), "{word}");
    }
}

/// A polling district is named within its local authority: alone it is the caller's mistake
/// (400, saying what it needs), not the datastore's failure; with it, or without either, the
/// query resolves, on every route that takes area filters.
#[test]
fn a_later_area_key_field_needs_the_ones_before_it() {
    for path in ["/voter/electors", "/voter/electors/export"] {
        let e = get(path, Some("polling_district=CGW1")).unwrap_err();
        let GatewayError::BadRequest(why) = e else {
            panic!("{path}: {e:?}")
        };
        assert!(
            why.contains("`polling_district` needs `local_authority`"),
            "{why}"
        );
        let r = get(
            path,
            Some("polling_district=CGW1&local_authority=E08000035"),
        )
        .unwrap();
        assert_eq!(r.filters.len(), 2);
        assert!(get(path, Some("local_authority=E08000035")).is_ok());
        assert!(get(path, Some("ward=E05011391")).is_ok());
    }
    let e = get(
        "/voter/electors/aggregate",
        Some("by=ward&polling_district=CGW1"),
    )
    .unwrap_err();
    assert!(
        matches!(&e, GatewayError::BadRequest(why) if why.contains("needs `local_authority`")),
        "{e:?}"
    );
}

/// An id holds letters, digits, `-` and `_` only: every character below 256 checked against
/// that rule as written, not against the table the check reads.
#[test]
fn an_id_holds_letters_digits_hyphens_and_underscores_only() {
    for c in (0u32..256).filter_map(char::from_u32) {
        let id = format!("VF-{c}1");
        let plain = c.is_ascii_alphanumeric() || c == '-' || c == '_';
        assert_eq!(valid_id(&id), plain, "{id:?}");
    }
    assert!(!valid_id(""));
    assert!(valid_id(&"a".repeat(MAX_VALUE_LEN)));
    assert!(!valid_id(&"a".repeat(MAX_VALUE_LEN + 1)));
    assert!(!subject_id("export") && subject_id("exports"));
}

/// A postcode narrows a request for its policies (`context.filters`) only down to part of a sector;
/// a blank value is no filter at all, refused.
#[test]
fn only_part_of_a_postcode_sector_or_finer_narrows_for_the_policies() {
    let narrowing = |q: &str| get("/voter/electors", Some(q)).unwrap().narrowing();
    for sector in [
        "LS15+8A", "LS15+8AB", "ls15+8ab", "SW1A+1AA", "E7+0B", "N1+9GU", "LS1+5A",
    ] {
        assert_eq!(
            narrowing(&format!("postcode={sector}")),
            ["postcode"],
            "{sector}"
        );
    }
    // Not a sector alone: datastores match without spaces, so `LS1 5` is all of `LS15`.
    for wide in [
        "LS15",
        "L",
        "LS",
        "LS15+",
        "LS15+A",
        "LS15+8ABC",
        "1S15+8A",
        "LS15-8A",
        "__+8A",
        "LS1_+8A",
        "LS15+8",
        "LS1+5",
        "LS15+81",
        "LS15+8A1",
    ] {
        assert!(narrowing(&format!("postcode={wide}")).is_empty(), "{wide}");
    }
    // Other filters narrow as given, beside a wide postcode or not.
    assert_eq!(narrowing("ward=E05011391&postcode=LS15"), ["ward"]);
    for blank in ["postcode=+", "postcode=++", "ward=+"] {
        assert!(
            matches!(
                get("/voter/electors", Some(blank)),
                Err(GatewayError::BadRequest(_))
            ),
            "{blank}"
        );
    }
}

/// A read by id takes a postcode and no other filter, and the record's postcode must begin
/// with it as datastores compare them: without spaces, in either case.
#[test]
fn a_read_names_only_a_postcode_that_the_record_must_match() {
    let read = get("/voter/electors/VF-1", Some("postcode=LS15+8A")).unwrap();
    assert_eq!(read.narrowing(), ["postcode"]);
    for other in ["ward=E05011391", "page=2", "per_page=5"] {
        assert!(
            matches!(
                get("/voter/electors/VF-1", Some(other)),
                Err(GatewayError::BadRequest(_))
            ),
            "{other}"
        );
    }
    for (postcode, filter) in [
        ("LS15 8AB", "LS15 8A"),
        ("LS15 8AB", "ls15 8ab"),
        ("LS158AB", "LS15 8A"),
        ("ls15 8ab", "LS15 8AB"),
        // A no-break space, as the demo datastore reads it (any Unicode space).
        ("LS15\u{a0}8AB", "LS15 8A"),
    ] {
        assert!(postcode_matches(postcode, filter), "{postcode} {filter}");
    }
    for (postcode, filter) in [
        ("LS15 8AB", "LS15 8B"),
        ("LS1 58AB", "LS15 9"),
        ("LS15 8A", "LS15 8AB"),
        ("", "LS15 8A"),
        ("LS15 8AB", ""),
        ("LS15 8AB", " "),
    ] {
        assert!(!postcode_matches(postcode, filter), "{postcode} {filter}");
    }
}
