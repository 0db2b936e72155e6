use super::*;

fn no_env(_: &str) -> Option<String> {
    None
}

const MINIMAL: &str = r#"
[[backend]]
name = "llama"
url = "http://127.0.0.1:8001/"
hosting = "self_hosted"
models = [{ name = "meta-llama/Llama-3.1-8B-Instruct", aliases = ["chat-small"] }]

[[team]]
name = "search"
keys = ["sha256:96cfb4baad3d112787dbe4c4d2d81b26260bd5a340fc29bba1b4b3fde0ad86fa"]
"#;

fn errors_of(text: &str) -> Vec<String> {
    match parse(text, "t.toml", &no_env) {
        Ok(_) => vec![],
        Err(e) => e.errors.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn minimal_config_gets_defaults() {
    let c = parse(MINIMAL, "t.toml", &no_env).unwrap();
    assert_eq!(c.server.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(c.server.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
    let b = &c.backends[0];
    assert_eq!(b.base_url, "http://127.0.0.1:8001");
    assert_eq!(
        b.on_disconnect,
        OnDisconnect::Cancel,
        "self-hosted defaults to cancel"
    );
    assert_eq!(c.teams[0].key_hashes.len(), 1);
}

#[test]
fn the_design_example_is_valid() {
    let text = include_str!("../../../config/tollgate.toml");
    let c = parse(text, "tollgate.toml", &|_| Some("sk-test".into())).unwrap();
    assert!(c.missing_keys.is_empty());
    assert_eq!(
        c.backends[1].on_disconnect,
        OnDisconnect::Drain,
        "commercial defaults to drain"
    );
}

#[test]
fn a_missing_backend_key_is_reported_not_fatal() {
    let text = include_str!("../../../config/tollgate.toml");
    let c = parse(text, "tollgate.toml", &no_env).unwrap();
    assert_eq!(
        c.missing_keys,
        vec!["backend[1].api_key_env names $OPENAI_API_KEY, which is not set"]
    );
}

#[test]
fn errors_name_the_field() {
    let bad = MINIMAL.replace("aliases = [\"chat-small\"]", "context_window = 0");
    let errs = errors_of(&bad);
    assert!(
        errs.contains(&"backend[0].models[0].context_window must be > 0".to_string()),
        "{errs:?}"
    );
    // A word users choose from is checked by the parser, and still named by its path.
    let bad = MINIMAL.replace("aliases = [\"chat-small\"]", "features = [\"telepathy\"]");
    let errs = errors_of(&bad);
    assert!(
        errs.iter()
            .any(|e| e.starts_with("backend[0].models[0].features[0] must be one of")),
        "{errs:?}"
    );
    let errs = errors_of(&MINIMAL.replace("\"self_hosted\"", "\"selfhosted\""));
    assert_eq!(
        errs,
        vec!["backend[0].hosting must be `self_hosted` or `commercial`; got `selfhosted`"]
    );
}

#[test]
fn a_store_this_build_cannot_keep_is_refused_and_its_password_not_shown() {
    let errs = errors_of(&format!(
        "[store]\nledger = \"postgres://tg:s3cret@db:54x32/ledger\"\n{MINIMAL}"
    ));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("store.ledger not a valid PostgreSQL URL"),
        "{errs:?}"
    );
    assert!(
        errs[0].contains("postgres://tg:*****@db:54x32/ledger"),
        "{errs:?}"
    );
    assert!(!errs.iter().any(|e| e.contains("s3cret")), "{errs:?}");
    let errs = errors_of(&format!(
        "{MINIMAL}budgets = [{{ window = \"day\", tokens = 10, fail_open = true }}]\n"
    ));
    assert_eq!(
        errs,
        vec!["team[0].budgets[0].fail_open has no effect with the local budget store, which cannot fail; remove it"]
    );
}

#[test]
fn libpq_tls_settings_of_the_ledger_url_are_checked_with_the_config() {
    // verify-full is libpq's and not the driver's: accepted all the same.
    parse(
        &format!("[store]\nledger = \"postgres://tg@db/ledger?sslmode=verify-full\"\n{MINIMAL}"),
        "t.toml",
        &no_env,
    )
    .unwrap();
    for (query, says) in [
        ("sslmode=allow", "sslmode=allow is not supported"),
        (
            "sslmode=verify-ca&sslrootcert=/no/such/ca.pem",
            "sslrootcert: cannot read /no/such/ca.pem",
        ),
    ] {
        let errs = errors_of(&format!(
            "[store]\nledger = \"postgres://tg:s3cret@db/ledger?{query}\"\n{MINIMAL}"
        ));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].starts_with("store.ledger"), "{errs:?}");
        assert!(errs[0].contains(says), "{errs:?}");
        assert!(!errs[0].contains("s3cret"), "{errs:?}");
    }
}

#[test]
fn a_postgres_ledger_is_accepted_with_its_spool_and_the_replica_named() {
    let c = parse(
        &format!(
            "[server]\nreplica = \"gw-1\"\n[store]\nledger = \"postgresql://tg@db:5432/ledger\"\nspool = \"sqlite://var/spool.db\"\n{MINIMAL}"
        ),
        "t.toml",
        &no_env,
    )
    .unwrap();
    assert_eq!(c.ledger_url.expose(), "postgresql://tg@db:5432/ledger");
    assert_eq!(c.ledger_spool, std::path::Path::new("var/spool.db"));
    assert_eq!(&*c.server.replica, "gw-1");
    let c = parse(MINIMAL, "t.toml", &no_env).unwrap();
    assert_eq!(c.ledger_spool, std::path::Path::new("data/spool.db"));
    assert!(c
        .server
        .replica
        .ends_with(&format!("-{}", std::process::id())));
    let errs = errors_of(&format!("[store]\nspool = \"/tmp/spool.db\"\n{MINIMAL}"));
    assert_eq!(
        errs,
        vec!["store.spool must be sqlite://path (got `/tmp/spool.db`)"]
    );
}

#[test]
fn a_redis_cluster_is_named_by_comma_separated_nodes_each_checked() {
    let nodes = "redis://:pw@10.0.0.5:7000, rediss://:pw@10.0.0.6:7001/0";
    let cfg = parse(
        &format!("[store]\nbudgets = \"{nodes}\"\nredis_cluster = true\n{MINIMAL}"),
        "t.toml",
        &no_env,
    )
    .unwrap();
    let BudgetStore::Redis(r) = &cfg.budget_store else {
        panic!("a Redis store")
    };
    assert!(r.cluster);
    assert_eq!(r.url.expose(), nodes);
    for (bad, why) in [
        (
            "redis://10.0.0.5:7000,memcached://:s3cret@10.0.0.6",
            "must be comma-separated",
        ),
        (
            "redis://10.0.0.5:7000,redis://:s3cret@10.0.0.6:7001/3",
            "only database 0",
        ),
        (
            "redis://10.0.0.5:7000,redis://:s3cret@10.0.0.6:nope",
            "is not a valid Redis URL",
        ),
    ] {
        let errs = errors_of(&format!(
            "[store]\nbudgets = \"{bad}\"\nredis_cluster = true\n{MINIMAL}"
        ));
        assert_eq!(errs.len(), 1, "{bad}: {errs:?}");
        assert!(errs[0].starts_with("store.budgets "), "{errs:?}");
        assert!(errs[0].contains(why), "{errs:?}");
        assert!(!errs[0].contains("s3cret"), "{errs:?}");
    }
    let errs = errors_of(
        &format!("[store]\nbudgets = \"redis://h:7000\"\nredis_cluster = true\n{MINIMAL}")
            .replace("name = \"search\"", "name = \"}search\""),
    );
    assert_eq!(
        errs,
        vec!["team[0].name must not start with `}` when budgets are in a Redis Cluster"]
    );
    // Without `redis_cluster` the list is one (bad) URL, not several nodes.
    let errs = errors_of(&format!(
        "[store]\nbudgets = \"redis://10.0.0.5:7000,redis://10.0.0.6:7001\"\n{MINIMAL}"
    ));
    assert_eq!(errs.len(), 1, "{errs:?}");
}

#[test]
fn a_private_ca_for_redis_is_for_tls_urls_and_must_be_a_readable_pem_file() {
    let dir = std::env::temp_dir().join(format!("tollgate-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, junk) = (dir.join("ca.pem"), dir.join("junk.pem"));
    std::fs::write(
        &ca,
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::write(&junk, "not a certificate").unwrap();
    let with = |url: &str, file: &std::path::Path| {
        format!(
            "[store]\nbudgets = \"{url}\"\nredis_ca_file = \"{}\"\n{MINIMAL}",
            file.display()
        )
    };
    let cfg = parse(&with("rediss://cache:6380/0", &ca), "t.toml", &no_env).unwrap();
    let BudgetStore::Redis(r) = &cfg.budget_store else {
        panic!("a Redis store")
    };
    assert_eq!(r.ca_file.as_deref(), Some(ca.as_path()));
    let errs = errors_of(&with("redis://cache:6379/0", &ca));
    assert_eq!(
        errs,
        vec!["store.redis_ca_file is for TLS only: store.budgets must then be rediss://…"]
    );
    let errs = errors_of(&with("rediss://cache:6380/0", &junk));
    assert!(errs[0].contains("holds no PEM certificate"), "{errs:?}");
    let errs = errors_of(&with("rediss://cache:6380/0", &dir.join("missing.pem")));
    assert!(
        errs[0].starts_with("store.redis_ca_file cannot read"),
        "{errs:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn budgets_in_redis_are_accepted_and_a_bad_url_is_named_with_its_password_hidden() {
    for url in [
        "redis://127.0.0.1:6379/0",
        "rediss://:pw@cache.internal:6380/2",
        "redis://user:pw@127.0.0.1",
    ] {
        let cfg = parse(&format!(
            "[store]\nbudgets = \"{url}\"\n{MINIMAL}budgets = [{{ window = \"day\", tokens = 10, fail_open = true }}]\n"
        ), "t.toml", &no_env)
        .unwrap();
        let BudgetStore::Redis(r) = &cfg.budget_store else {
            panic!("{url} is a Redis store")
        };
        assert_eq!(r.url.expose(), url);
        assert_eq!(r.prefix, "tollgate:");
        assert_eq!(r.lease, Duration::from_secs(30));
        assert!(cfg.teams[0].budgets[0].fail_open);
    }
    for bad in [
        "redis://:s3cret@cache.internal:notaport/0",
        "redis://:s3cret@cache.internal:6379/notadb",
        "memcached://:s3cret@cache.internal",
    ] {
        let errs = errors_of(&format!("[store]\nbudgets = \"{bad}\"\n{MINIMAL}"));
        assert_eq!(errs.len(), 1, "{bad}: {errs:?}");
        assert!(errs[0].starts_with("store.budgets "), "{errs:?}");
        assert!(errs[0].contains("cache.internal"), "{errs:?}");
        assert!(!errs[0].contains("s3cret"), "{errs:?}");
    }
    let errs = errors_of(&format!(
        "[store]\nbudgets = \"redis://h\"\nfail_open_share = 2.0\nredis_timeout_ms = 0\nlease_s = 0\nredis_prefix = \"{{x}}\"\n{MINIMAL}"
    ));
    assert_eq!(
        errs,
        vec![
            "store.redis_timeout_ms must be in 1..=5000",
            "store.fail_open_share must be in [0, 1]",
            "store.redis_prefix must be non-empty and without `{` or `}`",
            "store.lease_s must be in 1..=86400",
        ]
    );
}

#[test]
fn unknown_fields_are_refused_with_their_name() {
    let errs = errors_of(&format!("{MINIMAL}\n[server]\nlistn = \"127.0.0.1:1\"\n"));
    assert!(errs[0].contains("unknown field `listn`"), "{errs:?}");
}

#[test]
fn bad_urls_keys_and_duplicates_are_refused() {
    let bad = MINIMAL
        .replace("http://127.0.0.1:8001/", "ftp://x")
        .replace("sha256:96cf", "md5:96cf")
        + "\n[[team]]\nname = \"search\"\n";
    let errs = errors_of(&bad);
    assert!(
        errs.iter().any(|e| e.starts_with("backend[0].url")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with("team[0].keys[0] must be `sha256:`")),
        "{errs:?}"
    );
    assert!(
        errs.contains(&"team[1].name `search` is used by another team".to_string()),
        "{errs:?}"
    );
}

#[test]
fn a_key_shared_by_two_teams_is_refused() {
    let dup = format!(
        "{MINIMAL}\n[[team]]\nname = \"other\"\nkeys = [\"sha256:96cfb4baad3d112787dbe4c4d2d81b26260bd5a340fc29bba1b4b3fde0ad86fa\"]\n"
    );
    assert_eq!(
        errors_of(&dup),
        vec!["team[1].keys[0] is also a key of team `search`"]
    );
}

#[test]
fn url_credentials_would_leak_and_are_refused() {
    let errs =
        errors_of(&MINIMAL.replace("http://127.0.0.1:8001/", "https://user:pw@api.example.com"));
    assert!(
        errs[0].starts_with("backend[0].url must not carry credentials"),
        "{errs:?}"
    );
}

#[test]
fn the_focus_section_has_defaults_and_names_its_fields() {
    let c = parse(MINIMAL, "t.toml", &no_env).unwrap();
    assert_eq!(c.focus.billing_account_id, DEFAULT_FOCUS_BILLING_ACCOUNT_ID);
    assert_eq!(
        c.focus.billing_account_name,
        DEFAULT_FOCUS_BILLING_ACCOUNT_NAME
    );
    assert_eq!(c.focus.provider_name, DEFAULT_FOCUS_PROVIDER_NAME);
    // The issuer and the self-hosted GPUs' host are the provider unless said otherwise.
    assert_eq!(c.focus.invoice_issuer_name, DEFAULT_FOCUS_PROVIDER_NAME);
    assert_eq!(c.focus.host_provider_name, DEFAULT_FOCUS_PROVIDER_NAME);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);

    let set = format!(
        "{MINIMAL}\n[focus]\nbilling_account_id = \"cc-42\"\nbilling_account_name = \"R&D\"\n\
         provider_name = \"Acme AI Platform\"\nhost_provider_name = \"AWS\"\n"
    );
    let c = parse(&set, "t.toml", &no_env).unwrap();
    assert_eq!(
        (
            &*c.focus.billing_account_id,
            &*c.focus.billing_account_name,
            &*c.focus.provider_name,
            &*c.focus.invoice_issuer_name,
            &*c.focus.host_provider_name
        ),
        (
            "cc-42",
            "R&D",
            "Acme AI Platform",
            "Acme AI Platform",
            "AWS"
        )
    );

    let errs = errors_of(&format!(
        "{MINIMAL}\n[focus]\nbilling_account_id = \"\"\ninvoice_issuer_name = \" \"\n"
    ));
    assert_eq!(
        errs,
        vec![
            "focus.billing_account_id must not be empty",
            "focus.invoice_issuer_name must not be empty",
        ]
    );
    let errs = errors_of(&format!("{MINIMAL}\n[focus]\nbiling_account_id = \"x\"\n"));
    assert!(
        errs[0].contains("unknown field `biling_account_id`"),
        "{errs:?}"
    );

    let other_issuer = format!("{MINIMAL}\n[focus]\ninvoice_issuer_name = \"Finance\"\n");
    let c = parse(&other_issuer, "t.toml", &no_env).unwrap();
    assert!(
        c.warnings[0].contains("BilledCost-C-005-C"),
        "{:?}",
        c.warnings
    );
}

#[test]
fn an_admin_port_open_to_the_network_needs_a_key_or_admin_open() {
    let exposed = format!("[server]\nadmin_listen = \"0.0.0.0:9090\"\n{MINIMAL}");
    let errs = errors_of(&exposed);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("server.admin_key_env names $TOLLGATE_ADMIN_KEY, which is not set"),
        "{errs:?}"
    );
    assert!(
        errs[0].contains("server.admin_open = true") && errs[0].contains("0.0.0.0:9090"),
        "the message says how to fix it: {errs:?}"
    );

    // With the key, or by saying so, it starts; saying so is a warning.
    let with_key = |var: &str| (var == "TOLLGATE_ADMIN_KEY").then(|| "adm".to_string());
    let c = parse(&exposed, "t.toml", &with_key).unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let open = exposed.replace("[server]\n", "[server]\nadmin_open = true\n");
    let c = parse(&open, "t.toml", &no_env).unwrap();
    assert!(c.server.admin_open);
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(
        c.warnings[0].contains("server.admin_open") && c.warnings[0].contains("0.0.0.0:9090"),
        "{:?}",
        c.warnings
    );

    // Loopback only: starts without a key (local users and processes can reach it).
    for addr in ["127.0.0.1:9090", "[::1]:9090"] {
        let local = format!("[server]\nadmin_listen = \"{addr}\"\n{MINIMAL}");
        let c = parse(&local, "t.toml", &no_env).unwrap();
        assert!(!c.server.admin_open);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }
}

#[test]
fn no_error_quotes_a_password_or_a_key() {
    let cases = [
        // A syntax error on the password's line: where it is, not the line itself.
        format!("[store]\nledger = \"postgres://tg:s3cret@db/ledger\" x\n{MINIMAL}"),
        // A password with a `/` (base64), which a URL parser takes for the end of the host.
        format!("[store]\nbudgets = \"redis://default:a/s3cret@cache:6379\"\n{MINIMAL}"),
        format!("[store]\nledger = \"postgres://db/ledger?password=s3cret&port=x\"\n{MINIMAL}"),
        MINIMAL.replace("http://127.0.0.1:8001/", "gpu-1:s3cret@10.0.0.7"),
        MINIMAL.replace(
            "http://127.0.0.1:8001/",
            "https://a:b/s3cret@api.example.com",
        ),
        // A key pasted where the name of its variable belongs.
        MINIMAL.replace("hosting =", "api_key_env = \"sk-proj-s3cret\"\nhosting ="),
        format!(
            "[server]\nadmin_key_env = \"adm-s3cret\"\nadmin_listen = \"0.0.0.0:9\"\n{MINIMAL}"
        ),
    ];
    for text in cases {
        let errs = errors_of(&text);
        assert!(!errs.is_empty(), "{text}");
        assert!(!errs.iter().any(|e| e.contains("s3cret")), "{errs:?}");
    }
    assert_eq!(
        errors_of(&format!(
            "[store]\nledger = \"postgres://tg:s3cret@db/ledger\" x\n{MINIMAL}"
        )),
        vec!["TOML parse error at line 2, column 43: expected newline, `#`"]
    );
    let errs =
        errors_of(&MINIMAL.replace("hosting =", "api_key_env = \"sk-proj-s3cret\"\nhosting ="));
    assert_eq!(
        errs,
        vec!["backend[0].api_key_env must be the name of an environment variable (letters, digits, _) that holds the key, not the key itself"]
    );
}

#[test]
fn a_gpu_cost_from_purchase_power_and_cooling_is_its_hourly_rate() {
    let gpu = |fields: &str| {
        MINIMAL.replace(
            "hosting = \"self_hosted\"",
            &format!("hosting = \"self_hosted\"\ngpu = {{ {fields} }}"),
        )
    };
    // $29,200 over 40 months of 730 h is $1/h; 700 W at $0.20/kWh is $0.14/h, cooled at +50%.
    let c = parse(
        &gpu("purchase_usd = 29200, amortization_months = 40, power_watts = 700, usd_per_kwh = 0.20, cooling_overhead = 0.5"),
        "t.toml",
        &no_env,
    )
    .unwrap();
    let g = c.backends[0].gpu.as_ref().unwrap();
    let capex = g.capex.unwrap();
    assert!((capex.amortized_usd_per_hour - 1.0).abs() < 1e-12);
    assert!((capex.power_usd_per_hour - 0.14).abs() < 1e-12);
    assert!((capex.cooling_usd_per_hour - 0.07).abs() < 1e-12);
    assert_eq!(g.nusd_per_hour(), 1_210_000_000);

    let errs = |fields: &str| errors_of(&gpu(fields)).join("\n");
    let e = errs("hourly_usd = 2.0, purchase_usd = 1000, amortization_months = 12");
    assert!(
        e.contains("backend[0].gpu.hourly_usd") && e.contains("not both"),
        "{e}"
    );
    let e = errs("purchase_usd = 1000");
    assert!(
        e.contains("backend[0].gpu.amortization_months missing"),
        "{e}"
    );
    let e = errs("power_watts = 700, purchase_usd = 1, amortization_months = 1");
    assert!(e.contains("backend[0].gpu.usd_per_kwh missing"), "{e}");
    let e = errs("purchase_usd = 1000, amortization_months = 0");
    assert!(
        e.contains("backend[0].gpu.amortization_months must be > 0"),
        "{e}"
    );
    let e = errs("purchase_usd = 1, amortization_months = 1, power_watts = 1, usd_per_kwh = 1, cooling_overhead = -0.1");
    assert!(
        e.contains("backend[0].gpu.cooling_overhead must be >= 0"),
        "{e}"
    );
    let e = errs("count = 2");
    assert!(e.contains("backend[0].gpu.hourly_usd missing"), "{e}");
}
