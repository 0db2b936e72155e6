//! The `tollgate` binary as a user runs it.

mod common;

use common::*;
use std::process::Command;

fn tollgate() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("OPENAI_API_KEY");
    c
}

#[test]
fn check_prints_the_routing_table() {
    let out = tollgate()
        .args(["check", "--config", "config/tollgate.toml"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("warning: backend[1].api_key_env names $OPENAI_API_KEY, which is not set"),
        "{stdout}"
    );
    let row = stdout
        .lines()
        .find(|l| l.starts_with("chat-small"))
        .expect("chat-small row");
    assert!(
        row.contains("llama-onprem") && row.contains("meta-llama/Llama-3.1-8B-Instruct"),
        "{row}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with("openai") && l.contains("gpt-4o-mini")),
        "{stdout}"
    );
}

#[test]
fn check_explain_ranks_every_candidate_with_its_cost_or_its_reason() {
    let explain = |extra: &[&str]| {
        let out = tollgate()
            .args([
                "check",
                "--config",
                "config/demo.toml",
                "--explain",
                "--model",
                "chat-small",
            ])
            .args(extra)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let row = |out: &str, backend: &str| {
        out.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(backend))
            .unwrap_or_else(|| panic!("no row for {backend}: {out}"))
            .to_string()
    };
    // The owned GPU first (marginal), the provider as fallback with its expected cost:
    // 3000 prompt tokens at $0.15/M + 256 expected output at $0.60/M + egress.
    let out = explain(&["--prompt-tokens", "3000"]);
    let gpu = row(&out, "llama-onprem");
    assert!(
        gpu.starts_with('1') && gpu.contains("marginal") && gpu.contains("chosen"),
        "{out}"
    );
    let api = row(&out, "openai-sim");
    assert!(
        api.starts_with('2') && api.contains("0.000604") && api.contains("fallback"),
        "{out}"
    );
    // A team restricted to the EU, a vision request, a prompt over every window.
    let out = explain(&["--team", "support"]);
    assert!(
        row(&out, "openai-sim").contains("excluded: region us is not among the team's regions"),
        "{out}"
    );
    let out = explain(&["--features", "vision"]);
    assert!(
        row(&out, "llama-onprem").contains("excluded: does not support vision"),
        "{out}"
    );
    let out = explain(&["--prompt-tokens", "200000"]);
    assert!(
        row(&out, "llama-onprem").contains("excluded: needs 200000 tokens"),
        "{out}"
    );
    assert!(out.contains("cannot serve this request"), "{out}");
}

#[test]
fn check_names_the_bad_field_and_fails() {
    let dir = std::env::temp_dir().join(format!("tollgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    let text = std::fs::read_to_string("config/tollgate.toml")
        .unwrap()
        .replace("context_window = 131072", "context_window = 0");
    std::fs::write(&path, text).unwrap();
    let out = tollgate()
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("backend[0].models[0].context_window must be > 0"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn key_new_prints_a_key_and_its_hash() {
    let out = tollgate()
        .args(["key", "new", "--team", "search"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let key = stdout
        .lines()
        .find_map(|l| l.strip_prefix("key:  "))
        .unwrap();
    let hash = stdout
        .lines()
        .find_map(|l| l.strip_prefix("hash: "))
        .unwrap();
    assert_eq!(
        tollgate::config::parse_key_hash(hash),
        Some(tollgate::keys::hash_key(key))
    );
    assert!(stdout.contains("name = \"search\""));
}

#[test]
fn demo_runs_end_to_end() {
    // Its own directory: the demo's ledger (data/demo.db), and so its budgets, start empty.
    let out = tollgate()
        .current_dir(temp_dir("demo"))
        .args(["demo", "--requests-per-team", "8"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("24/24 requests answered"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("search") && l.contains("llama-onprem")),
        "{stdout}"
    );
    // Anthropic's side: a Claude model behind Anthropic's API, asked by an Anthropic client
    // and an OpenAI one, priced from the catalog.
    assert!(
        stdout.lines().any(|l| l.starts_with("research")
            && l.contains("claude-haiku-4-5")
            && l.contains("anthropic-sim")),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_and_exits_cleanly_on_sigterm() {
    let (text, _sims, _) = Harness::new()
        .backend(Backend::sim("llama", "m").alias("chat-small"))
        .team("search", SEARCH_KEY)
        .render()
        .await;
    let path = temp_dir("serve").join("tollgate.toml");
    std::fs::write(&path, text).unwrap();
    let gw = BinaryGateway::start(&path).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let req = http::Request::post(format!("http://{}/v1/chat/completions", gw.addr))
        .header("authorization", format!("Bearer {SEARCH_KEY}"))
        .body(http_body_util::Full::<bytes::Bytes>::from(chat(
            "chat-small",
            false,
        )))
        .unwrap();
    assert_eq!(client.request(req).await.unwrap().status(), 200);
    let (status, log) = gw.stop("-TERM").await;
    assert!(status.success(), "exit status {status:?}\n{log}");
    assert!(log.contains("shutting down"), "{log}");
}

/// `config/tollgate.toml` with its admin port on `admin_listen`, `admin_open` as given, and its
/// admin key read from a variable no test sets.
fn config_with_admin(admin_listen: &str, admin_open: bool) -> std::path::PathBuf {
    let text = std::fs::read_to_string("config/tollgate.toml")
        .unwrap()
        .replace(
            "admin_listen = \"127.0.0.1:9090\"",
            &format!("admin_listen = \"{admin_listen}\""),
        )
        .replace("admin_open = false", &format!("admin_open = {admin_open}"))
        .replace("TOLLGATE_ADMIN_KEY", "TOLLGATE_TEST_UNSET_ADMIN_KEY");
    let path = temp_dir("admin").join("tollgate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn an_admin_port_open_to_the_network_without_a_key_is_refused() {
    let path = config_with_admin("0.0.0.0:9090", false);
    for command in ["check", "serve"] {
        let out = tollgate()
            .env_remove("TOLLGATE_TEST_UNSET_ADMIN_KEY")
            .args([command, "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{command} accepted it: {stderr}");
        assert!(
            stderr.contains(
                "server.admin_key_env names $TOLLGATE_TEST_UNSET_ADMIN_KEY, which is not set"
            ) && stderr.contains("server.admin_open = true"),
            "{command}: {stderr}"
        );
    }
    // Saying so on purpose: `check` passes and warns.
    let path = config_with_admin("0.0.0.0:9090", true);
    let out = tollgate()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("warning: server.admin_open is true"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_port_without_a_key_says_so_when_it_starts() {
    let (text, _sims, _) = Harness::new()
        .backend(Backend::sim("llama", "m"))
        .team("search", SEARCH_KEY)
        .server("admin_key_env = \"TOLLGATE_TEST_UNSET_ADMIN_KEY\"")
        .render()
        .await;
    let path = temp_dir("admin-log").join("tollgate.toml");
    std::fs::write(&path, &text).unwrap();
    // Both lines come before `listening`, which `start` waits for.
    let (_, log) = BinaryGateway::start(&path).await.stop("-KILL").await;
    assert_eq!(
        log.matches("admin port").count(),
        1,
        "said once at start:\n{log}"
    );
    assert!(
        log.contains("INFO") && log.contains("open on loopback only"),
        "{log}"
    );

    let open = text.replace(
        "admin_listen = \"127.0.0.1:0\"",
        "admin_listen = \"0.0.0.0:0\"\nadmin_open = true",
    );
    std::fs::write(&path, open).unwrap();
    let (_, log) = BinaryGateway::start(&path).await.stop("-KILL").await;
    assert_eq!(
        log.matches("admin_open").count(),
        1,
        "warned once at start:\n{log}"
    );
    assert!(log.contains("WARN"), "{log}");
}

/// Runs the binary with its stdout a pipe whose reader is already gone, as `| head -1` leaves
/// it once head has its line: every write fails with EPIPE.
fn run_into_a_closed_pipe(args: &[&std::ffi::OsStr]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    tollgate().args(args).stdout(writer).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_into_a_closed_pipe_ends_quietly() {
    // A gateway that ran once leaves the ledger the reports read.
    let gw = basic().await;
    let config = temp_dir("pipe").join("tollgate.toml");
    std::fs::write(&config, &gw.config_text).unwrap();
    gw.shutdown().await;
    let config = config.as_os_str();
    let runs: [&[&str]; 5] = [
        &["check", "--config"],
        &["check", "--explain", "--model", "chat-small", "--config"],
        &["report", "--format", "table", "--config"],
        &["report", "--format", "json", "--config"],
        &["report", "--format", "focus", "--config"],
    ];
    for args in runs {
        let mut all: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        all.push(config);
        let out = run_into_a_closed_pipe(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !stderr.contains("panicked") && !stderr.contains("Error"),
            "{args:?}: {:?}\n{stderr}",
            out.status
        );
    }
    let out = run_into_a_closed_pipe(&[
        "key".as_ref(),
        "new".as_ref(),
        "--team".as_ref(),
        "x".as_ref(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_never_prints_a_store_password_or_a_key() {
    let base = std::fs::read_to_string("config/tollgate.toml").unwrap();
    let secret_free = |what: &str, text: String| {
        let path = temp_dir("secrets").join("tollgate.toml");
        std::fs::write(&path, text).unwrap();
        let out = tollgate()
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{what}: {all}");
        assert!(!all.contains("s3cret"), "{what} leaked:\n{all}");
        all
    };
    // Passwords in store URLs, including ones with characters that end a URL's authority
    // (the PostgreSQL URL is malformed on purpose: its port).
    let all = secret_free(
        "store URLs",
        base.replace(
            "\"sqlite://data/tollgate.db\"",
            "\"postgres://tollgate:pg/s3cret@db.internal:54x32/ledger\"",
        )
        .replace(
            "budgets = \"local\"",
            "budgets = \"redis://:rd/s3cret@cache.internal:6379/0\"",
        ),
    );
    assert!(
        all.contains("store.ledger") && all.contains("db.internal:54x32/ledger"),
        "{all}"
    );
    assert!(
        all.contains("store.budgets") && all.contains("cache.internal:6379/0"),
        "{all}"
    );
    secret_free(
        "a password as a URL parameter",
        base.replace(
            "\"sqlite://data/tollgate.db\"",
            "\"postgres://db.internal/ledger?user=tg&password=s3cret&port=x\"",
        )
        .replace(
            "budgets = \"local\"",
            "budgets = \"rediss://default:s3cret@cache.internal:6380\"",
        ),
    );
    // A syntax error quotes its line, and the line may be the one with the password.
    secret_free(
        "a TOML syntax error",
        base.replace(
            "\"sqlite://data/tollgate.db\"",
            "\"postgres://tollgate:s3cret@db.internal/ledger\" x",
        ),
    );
    // A backend URL with credentials, and a key pasted where its variable's name belongs.
    let all = secret_free(
        "a backend URL and a pasted key",
        base.replace("http://127.0.0.1:8001", "ftp://admin:s3cret@gpu-1")
            .replace("\"OPENAI_API_KEY\"", "\"sk-proj-s3cret\"")
            .replace("\"TOLLGATE_ADMIN_KEY\"", "\"adm-s3cret\""),
    );
    assert!(all.contains("backend[1].api_key_env"), "{all}");
    assert!(all.contains("server.admin_key_env"), "{all}");
}

#[test]
fn what_if_and_statement_name_bad_input_and_fail_without_panicking() {
    let missing = temp_dir("what-if-missing").join("nowhere.toml");
    let missing = missing.to_str().unwrap();
    let cases: [(&[&str], &str); 7] = [
        (&["--what-if", missing], "nowhere.toml"),
        (
            &["--statement", "--month", "2026-13"],
            "`2026-13` as a month",
        ),
        (&["--statement"], "--month"),
        (
            &["--statement", "--month", "2026-11", "--what-if", "x.toml"],
            "--what-if",
        ),
        (
            &["--statement", "--month", "2026-11", "--format", "focus"],
            "--format focus",
        ),
        (&["--chargeback"], "--statement"),
        (
            &["--month", "2026-11"],
            "--month is for --statement or --what-if",
        ),
    ];
    for (args, named) in cases {
        let out = tollgate()
            .args(["report", "--config", "config/tollgate.toml"])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            stderr.contains(named) && !stderr.contains("panicked"),
            "{args:?} should name {named}: {stderr}"
        );
    }
}

/// `0.000123450` → 123450 nano-dollars.
fn nusd(usd: &str) -> i64 {
    let (whole, frac) = usd.split_once('.').unwrap_or((usd, "0"));
    let frac = format!("{frac:0<9}");
    whole.parse::<i64>().unwrap() * 1_000_000_000 + frac[..9].parse::<i64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_statement_bills_what_the_focus_export_bills_and_a_config_against_itself_changes_nothing(
) {
    let month = tollgate::clock::format_time(tollgate::clock::unix_now_us())[..7].to_string();
    let gw = Harness::new()
        .backend(
            Backend::sim("llama", "meta-llama/Llama-3.1-8B-Instruct")
                .alias("chat-small")
                .toml("gpu = { hourly_usd = 2.0, count = 1, tokens_per_second = 1000 }\n"),
        )
        .backend(Backend::sim("openai", "gpt-4o-mini").commercial())
        .team("search", SEARCH_KEY)
        .start()
        .await;
    for model in ["chat-small", "gpt-4o-mini", "gpt-4o-mini"] {
        let r = gw
            .post("/v1/chat/completions", SEARCH_KEY, chat(model, false))
            .await;
        assert_eq!(r.status, 200, "{model}");
    }
    let config = temp_dir("statement-cli").join("tollgate.toml");
    std::fs::write(&config, &gw.config_text).unwrap();
    gw.shutdown().await;
    let run = |args: &[&str]| {
        let out = tollgate()
            .args(["report", "--config", config.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let statement: serde_json::Value = serde_json::from_str(&run(&[
        "--statement",
        "--month",
        &month,
        "--format",
        "json",
    ]))
    .unwrap();
    let total = nusd(&statement["total_usd"].to_string());
    assert!(total > 0, "{statement}");
    assert_eq!(nusd(&statement["ledger_total_usd"].to_string()), total);
    let focus = run(&["--format", "focus", "--since", &format!("{month}-01")]);
    let billed: i64 = focus
        .lines()
        .skip(1)
        .map(|l| nusd(l.split(',').next().unwrap()))
        .sum();
    assert_eq!(billed, total, "{focus}");

    let same: serde_json::Value = serde_json::from_str(&run(&[
        "--what-if",
        config.to_str().unwrap(),
        "--month",
        &month,
        "--format",
        "json",
    ]))
    .unwrap();
    assert_eq!(same["delta_usd"].as_f64(), Some(0.0), "{same}");
    assert_eq!(same["now"], same["what_if"]);
    assert!(
        same["now"]["gpu_hours_usd"].as_f64().unwrap() > 0.0,
        "{same}"
    );
    let table = run(&["--what-if", config.to_str().unwrap(), "--month", &month]);
    assert!(table.contains("Owned GPUs"), "{table}");
}
