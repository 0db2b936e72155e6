//! The official OpenAI Python SDK drives the gateway (tests/sdk/openai_e2e.py).
//!
//! Needs Python 3 and the `openai` package: this test installs the pinned version from
//! tests/sdk/requirements.txt into target/sdk-venv on first run. Where that cannot be done
//! (no Python, no package index), it is skipped with the reason printed, unless `CI` is set,
//! where a skip would hide a broken end-to-end path and fails instead.

mod common;

use common::*;

const RESEARCH_KEY: &str = "tg-test-research";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_sdk_works_through_the_gateway() {
    let python = match tokio::task::spawn_blocking(sdk_python).await.unwrap() {
        Ok(p) => p,
        Err(why) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED the_official_openai_python_sdk_works_through_the_gateway: {why}");
            return;
        }
        Err(why) => panic!("CI is set, so the SDK test may not be skipped: {why}"),
    };
    let gw = Harness::new()
        .backend(
            Backend::sim("llama", "meta-llama/Llama-3.1-8B-Instruct")
                .alias("chat-small")
                .price(0.2, 0.2),
        )
        .backend(
            Backend::sim("openai", "text-embedding-3-small")
                .alias("embed")
                .api_key("sk-sim"),
        )
        .team("research", RESEARCH_KEY)
        .start()
        .await;
    let stdout = run_sdk_script(
        python,
        "openai_e2e.py",
        vec![
            ("TOLLGATE_BASE_URL", format!("http://{}/v1", gw.addr)),
            ("TOLLGATE_KEY", RESEARCH_KEY.into()),
            ("TOLLGATE_MODEL", "chat-small".into()),
            ("TOLLGATE_EMBED_MODEL", "embed".into()),
        ],
    )
    .await;
    assert!(
        stdout.contains("ok bad_key_401") && stdout.contains("ok unknown_model_404"),
        "{stdout}"
    );
}
