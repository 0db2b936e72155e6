//! The official Anthropic Python SDK (and the OpenAI one, against a Claude backend) drive the
//! gateway: tests/sdk/anthropic_e2e.py. The SDKs come from tests/sdk/requirements.txt into
//! target/sdk-venv, as for tests/sdk_openai.rs; skipped with the reason printed where they
//! cannot be installed, unless `CI` is set.

mod common;

use common::*;

const KEY: &str = "tg-test-claude-users";
const POOR_KEY: &str = "tg-test-spent";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_anthropic_python_sdk_works_through_the_gateway() {
    let python = match tokio::task::spawn_blocking(sdk_python).await.unwrap() {
        Ok(p) => p,
        Err(why) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED the_official_anthropic_python_sdk_works_through_the_gateway: {why}");
            return;
        }
        Err(why) => panic!("CI is set, so the SDK test may not be skipped: {why}"),
    };
    let gw = Harness::new()
        .backend(
            Backend::sim("llama", "llama-3.1-8b")
                .alias("small")
                .price(0.2, 0.6),
        )
        .backend(claude_backend())
        .team("apps", KEY)
        .team_toml(
            "spent",
            POOR_KEY,
            "budgets = [{ window = \"day\", tokens = 1 }]",
        )
        .start()
        .await;
    let stdout = run_sdk_script(
        python,
        "anthropic_e2e.py",
        vec![
            ("TOLLGATE_ROOT_URL", format!("http://{}", gw.addr)),
            ("TOLLGATE_KEY", KEY.into()),
            ("TOLLGATE_POOR_KEY", POOR_KEY.into()),
            ("TOLLGATE_OPENAI_MODEL", "small".into()),
            ("TOLLGATE_CLAUDE_MODEL", "sonnet".into()),
        ],
    )
    .await;
    assert!(
        stdout.contains("ok stream_tool_use_claude_backend"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok count_tokens_by_the_anthropic_backend"),
        "{stdout}"
    );
    // Every request the SDKs made that a backend answered is in the ledger, at the backend's
    // usage (the headers check compared them request by request).
    let rows: Vec<(String, String)> = gw.ledger(
        "SELECT backend, status FROM requests WHERE backend IS NOT NULL",
        |r| Ok((r.get(0)?, r.get(1)?)),
    );
    assert!(rows.iter().any(|(b, _)| b == "claude"), "{rows:?}");
    assert!(rows.iter().any(|(b, _)| b == "llama"), "{rows:?}");
    assert!(rows.iter().all(|(_, s)| s == "ok"), "{rows:?}");
}
