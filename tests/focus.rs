//! The FOCUS export, from the admin port and from the command line: every FOCUS column, and
//! figures that add up to the ledger's exactly.

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use tollgate::config::prices::Catalog;
use tollgate::meter::{cost_nusd, TokenSource, Usage};

const LLAMA: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// Written out again rather than taken from `tollgate::focus::COLUMNS`: this is the contract
/// FinOps tools load by, and a change to the code's list must fail here.
const COLUMNS: [&str; 42] = [
    "BilledCost",
    "EffectiveCost",
    "ListCost",
    "ContractedCost",
    "BillingCurrency",
    "BillingAccountId",
    "BillingAccountName",
    "BillingPeriodStart",
    "BillingPeriodEnd",
    "ChargePeriodStart",
    "ChargePeriodEnd",
    "ChargeCategory",
    "ChargeClass",
    "ChargeFrequency",
    "ChargeDescription",
    "InvoiceId",
    "InvoiceIssuerName",
    "ServiceProviderName",
    "HostProviderName",
    "ProviderName",
    "PublisherName",
    "ServiceName",
    "ServiceCategory",
    "ServiceSubcategory",
    "ResourceId",
    "ResourceName",
    "RegionId",
    "SkuId",
    "SkuPriceId",
    "ConsumedQuantity",
    "ConsumedUnit",
    "PricingQuantity",
    "PricingUnit",
    "Tags",
    "x_Team",
    "x_PrincipalId",
    "x_CredentialId",
    "x_Hosting",
    "x_Requests",
    "x_PromptTokens",
    "x_CompletionTokens",
    "x_CachedTokens",
];

/// RFC 4180 records: quoted fields may hold commas, doubled quotes and line breaks.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut records = vec![];
    let (mut record, mut field) = (vec![], String::new());
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => field.push(c),
        }
    }
    assert!(
        !quoted && field.is_empty() && record.is_empty(),
        "ends with a line break"
    );
    records
}

/// Rows as column name → value.
fn rows(csv: &str) -> Vec<BTreeMap<String, String>> {
    let mut records = parse_csv(csv).into_iter();
    let header = records.next().expect("a header row");
    assert_eq!(header, COLUMNS, "every FOCUS column, in order");
    records
        .map(|r| {
            assert_eq!(r.len(), header.len(), "{r:?}");
            header.iter().cloned().zip(r).collect()
        })
        .collect()
}

/// An exact decimal USD string in nano-dollars.
fn nanos(usd: &str) -> i64 {
    let (whole, frac) = usd.split_once('.').unwrap();
    assert!(frac.len() <= 9, "{usd}");
    whole.parse::<i64>().unwrap() * 1_000_000_000 + format!("{frac:0<9}").parse::<i64>().unwrap()
}

/// What the ledger holds of one request.
struct Request {
    team: String,
    key_id: String,
    model: String,
    backend: String,
    started_at_us: i64,
    usage: Usage,
    cost_nusd: i64,
    egress_bytes: u64,
}

#[tokio::test]
async fn focus_export_adds_up_to_the_ledger_from_admin_and_cli() {
    let gw = Harness::new()
        .backend(
            Backend::sim("llama", LLAMA)
                .alias("chat-small")
                .region("eu")
                .toml("gpu = { hourly_usd = 2.40, count = 1, fraction = 1.0, tokens_per_second = 2500 }"),
        )
        .backend(
            // A negotiated price under the catalog's $0.15 / $0.60.
            Backend::sim("openai", "gpt-4o-mini")
                .alias("chat-large")
                .commercial()
                .region("us")
                .price(0.10, 0.40)
                .toml("egress_usd_per_gb = 0.09"),
        )
        .team_toml(
            "search",
            SEARCH_KEY,
            "tags = { department = \"rnd\" }\nrequest_tags = [\"project\"]",
        )
        .team_toml(
            "support",
            OTHER_KEY,
            "tags = { department = \"cx\" }\nrequest_tags = [\"project\"]",
        )
        .start()
        .await;
    for i in 0..16usize {
        let key = [SEARCH_KEY, OTHER_KEY][i % 2];
        let model = ["chat-small", "chat-large"][i / 2 % 2];
        let mut body: serde_json::Value = serde_json::from_str(&chat(model, i % 3 == 0)).unwrap();
        body["max_tokens"] = (4 + i).into();
        let mut req = gw.request("/v1/chat/completions", key, body.to_string());
        req.headers_mut().insert(
            "x-tollgate-tags",
            format!("project={}", ["alpha", "beta", "gamma"][i % 3])
                .parse()
                .unwrap(),
        );
        let r = gw.send(req).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }

    let ledger: Vec<Request> = gw.ledger(
        "SELECT team, served_model, backend, started_at_us, prompt_tokens, completion_tokens,
                cached_tokens, cost_nusd, egress_bytes, key_id FROM requests",
        |r| {
            let count = |i| r.get::<_, i64>(i).map(|n| n as u64);
            Ok(Request {
                team: r.get(0)?,
                key_id: r.get(9)?,
                model: r.get(1)?,
                backend: r.get(2)?,
                started_at_us: r.get(3)?,
                usage: Usage {
                    prompt: count(4)?,
                    completion: count(5)?,
                    cached: count(6)?,
                    cache_write: 0,
                    reasoning: 0,
                    source: TokenSource::Upstream,
                },
                cost_nusd: r.get(7)?,
                egress_bytes: count(8)?,
            })
        },
    );
    assert_eq!(ledger.len(), 16);

    let resp = gw.admin_get("/admin/report/focus").await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.headers["content-type"], "text/csv; charset=utf-8");
    assert_eq!(
        resp.headers["content-disposition"],
        "attachment; filename=\"tollgate-focus.csv\""
    );
    let csv = resp.text();
    let rows = rows(&csv);

    let billed: i64 = rows.iter().map(|r| nanos(&r["BilledCost"])).sum();
    assert_eq!(billed, ledger.iter().map(|l| l.cost_nusd).sum::<i64>());
    assert!(rows.iter().all(|r| r["EffectiveCost"] == r["BilledCost"]));
    let consumed: u64 = rows
        .iter()
        .map(|r| r["ConsumedQuantity"].parse::<u64>().unwrap())
        .sum();
    assert_eq!(
        consumed,
        ledger
            .iter()
            .map(|l| l.usage.prompt + l.usage.completion)
            .sum::<u64>()
    );
    assert_eq!(
        rows.iter()
            .map(|r| r["x_Requests"].parse::<usize>().unwrap())
            .sum::<usize>(),
        16
    );

    // One row per team × key × model × backend × hour (a run can straddle an hour).
    let hour = |us: i64| tollgate::report::format_time(us - us.rem_euclid(3_600_000_000));
    let expected: BTreeSet<(String, String, String, String, String)> = ledger
        .iter()
        .map(|l| {
            (
                l.team.clone(),
                l.key_id.clone(),
                l.model.clone(),
                l.backend.clone(),
                hour(l.started_at_us),
            )
        })
        .collect();
    let seen: Vec<(String, String, String, String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["x_Team"].clone(),
                r["x_CredentialId"].clone(),
                r["ResourceName"].clone(),
                r["ServiceName"].clone(),
                r["ChargePeriodStart"].clone(),
            )
        })
        .collect();
    assert_eq!(seen.len(), expected.len(), "no group twice: {seen:?}");
    assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), expected);

    let catalog = Catalog::builtin().price("gpt-4o-mini").unwrap();
    for r in &rows {
        let tags: serde_json::Value = serde_json::from_str(&r["Tags"]).unwrap();
        let department = if r["x_Team"] == "search" { "rnd" } else { "cx" };
        // The gateway's operator sells and bills every row, whichever backend served it.
        assert_eq!(
            (&*r["ServiceProviderName"], &*r["ProviderName"]),
            ("Tollgate", "Tollgate")
        );
        assert_eq!(r["InvoiceIssuerName"], "Tollgate");
        assert_eq!(
            tags["department"], department,
            "team tags are on every request"
        );
        match r["ServiceName"].as_str() {
            "llama" => {
                assert_eq!(
                    (&*r["HostProviderName"], &*r["x_Hosting"], &*r["RegionId"]),
                    ("Tollgate", "self_hosted", "eu")
                );
                assert_eq!(r["ResourceId"], format!("llama/{LLAMA}"));
                assert_eq!(
                    r["ListCost"], r["BilledCost"],
                    "a rate card is its own list"
                );
            }
            "openai" => {
                assert_eq!(
                    (&*r["HostProviderName"], &*r["x_Hosting"], &*r["RegionId"]),
                    ("openai", "commercial", "us")
                );
                // Each request at the catalog price, egress included, as metering rounds it.
                let list: i64 = ledger
                    .iter()
                    .filter(|l| {
                        l.backend == "openai"
                            && l.team == r["x_Team"]
                            && l.key_id == r["x_CredentialId"]
                            && hour(l.started_at_us) == r["ChargePeriodStart"]
                    })
                    .map(|l| cost_nusd(Some(&catalog), &l.usage, l.egress_bytes, Some(0.09)))
                    .sum();
                assert_eq!(nanos(&r["ListCost"]), list);
                assert!(nanos(&r["ListCost"]) > nanos(&r["BilledCost"]), "{r:?}");
            }
            other => panic!("unexpected backend {other}"),
        }
    }

    let e = gw
        .admin_get("/admin/report/focus?from=yesterday")
        .await
        .error(400);
    assert!(
        e["message"].as_str().unwrap().contains("`yesterday`"),
        "{e}"
    );

    // The command line reads the same ledger through the same config.
    let config = temp_dir("focus").join("tollgate.toml");
    std::fs::write(&config, &gw.config_text).unwrap();
    gw.shutdown().await;
    let tollgate = |format: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["report", "--format", format, "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    let out = tollgate("focus");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), csv);
    let out = tollgate("xml");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("use table, csv, json or focus"), "{stderr}");
}
