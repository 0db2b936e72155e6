use super::*;
use crate::ledger::testing::{rec, tokens, TempLedger};
use crate::ledger::Record;

/// 2026-11-22T10:00:00Z
const H0: i64 = 1_795_341_600_000_000;
const MIN: i64 = 60_000_000;
const LLAMA: &str = "meta-llama/Llama-3.1-8B-Instruct";

const CONFIG: &str = r#"
[[backend]]
name = "openai"
url = "http://127.0.0.1:9/"
hosting = "commercial"
region = "us"
egress_usd_per_gb = 0.09
models = [
  { name = "gpt-4o-mini", input_usd_per_mtok = 0.10, output_usd_per_mtok = 0.40 },
  { name = "gpt-4o" },
]

[[backend]]
name = "llama"
url = "http://127.0.0.1:8001/"
hosting = "self_hosted"
region = "eu"
gpu = { hourly_usd = 2.40, count = 1, tokens_per_second = 2500 }
models = [{ name = "meta-llama/Llama-3.1-8B-Instruct" }]

[[team]]
name = "search"
keys = ["sha256:96cfb4baad3d112787dbe4c4d2d81b26260bd5a340fc29bba1b4b3fde0ad86fa"]
tags = { department = "rnd" }
request_tags = ["project"]

[[team]]
name = "support"
keys = []
request_tags = ["project"]
"#;

fn config() -> Config {
    crate::config::parse(CONFIG, "focus.toml", &|_| None).unwrap()
}

/// Two hours, two teams, one of them with two keys, two configured backends and a retired
/// one, a varying `project` tag; and the requests no row may count: refused, failed upstream,
/// outside the period.
fn ledger() -> Vec<Record> {
    let search = |p: &str| format!(r#"{{"department":"rnd","project":"{p}"}}"#);
    let support = |p: &str| format!(r#"{{"project":"{p}"}}"#);
    vec![
        Record {
            cached_tokens: Some(200),
            ..tokens(
                rec(
                    H0 + 5 * MIN,
                    "search",
                    Some("openai"),
                    "gpt-4o-mini",
                    &search("alpha"),
                ),
                1000,
                500,
                100_000,
            )
        },
        Record {
            egress_bytes: 1_000_000,
            ..tokens(
                rec(
                    H0 + 20 * MIN,
                    "search",
                    Some("openai"),
                    "gpt-4o-mini",
                    &search("beta"),
                ),
                2000,
                100,
                50_000,
            )
        },
        tokens(
            rec(
                H0 + 30 * MIN,
                "search",
                Some("llama"),
                LLAMA,
                &search("alpha"),
            ),
            300,
            700,
            12_345,
        ),
        // The first microsecond of the next hour.
        tokens(
            rec(
                H0 + 60 * MIN,
                "search",
                Some("llama"),
                LLAMA,
                &search("alpha"),
            ),
            10,
            20,
            7,
        ),
        // The last microsecond of the first hour.
        tokens(
            rec(
                H0 + 60 * MIN - 1,
                "support",
                Some("llama"),
                LLAMA,
                &support("x"),
            ),
            1,
            2,
            3,
        ),
        tokens(
            rec(H0 + MIN, "support", Some("llama"), LLAMA, &support("y")),
            4,
            5,
            6,
        ),
        // The team's other key: a row of its own.
        Record {
            key_id: "k2".into(),
            ..tokens(
                rec(
                    H0 + 40 * MIN,
                    "support",
                    Some("llama"),
                    LLAMA,
                    &support("y"),
                ),
                7,
                8,
                9,
            )
        },
        tokens(
            rec(H0 + 10 * MIN, "support", Some("retired"), "gpt-4o", "{}"),
            100,
            100,
            1_000,
        ),
        Record {
            status: "rejected",
            http_status: 429,
            prompt_tokens: None,
            completion_tokens: None,
            ..rec(
                H0 + 2 * MIN,
                "search",
                None,
                "gpt-4o-mini",
                &search("alpha"),
            )
        },
        Record {
            status: "upstream_error",
            http_status: 400,
            ..tokens(
                rec(
                    H0 + 3 * MIN,
                    "search",
                    Some("openai"),
                    "gpt-4o-mini",
                    &search("alpha"),
                ),
                50,
                0,
                0,
            )
        },
        tokens(
            rec(
                H0 - 1,
                "search",
                Some("openai"),
                "gpt-4o-mini",
                &search("alpha"),
            ),
            1,
            1,
            1,
        ),
        tokens(
            rec(
                H0 + 120 * MIN,
                "search",
                Some("openai"),
                "gpt-4o-mini",
                &search("alpha"),
            ),
            1,
            1,
            1,
        ),
    ]
}

fn period() -> (Option<i64>, Option<i64>) {
    (Some(H0), Some(H0 + 120 * MIN))
}

#[test]
fn one_charge_per_team_backend_model_key_and_hour_in_focus_order() {
    let db = TempLedger::with("groups", &ledger());
    let (from, to) = period();
    let charges = query(&db.conn, &config(), from, to).unwrap();
    let keys: Vec<(i64, &str, &str, &str, &str, u64)> = charges
        .iter()
        .map(|c| {
            (
                c.period_start_us,
                &*c.team,
                &*c.backend,
                &*c.model,
                &*c.key_id,
                c.requests,
            )
        })
        .collect();
    assert_eq!(
        keys,
        vec![
            (H0, "search", "llama", LLAMA, "k1", 1),
            (H0, "search", "openai", "gpt-4o-mini", "k1", 2),
            (H0, "support", "llama", LLAMA, "k1", 2),
            (H0, "support", "llama", LLAMA, "k2", 1),
            (H0, "support", "retired", "gpt-4o", "k1", 1),
            (H0 + 60 * MIN, "search", "llama", LLAMA, "k1", 1),
        ]
    );

    let openai = &charges[1];
    assert_eq!(
        (
            openai.prompt_tokens,
            openai.completion_tokens,
            openai.cached_tokens
        ),
        (3000, 600, 200)
    );
    assert_eq!(openai.billed_nusd, 150_000);
    // At the catalog's $0.15 in, $0.075 cached, $0.60 out, plus $0.09/GB egress:
    // 800×150 + 200×75 + 500×600 = 435 000 and 2000×150 + 100×600 + 90 000 = 450 000.
    assert_eq!(openai.list_nusd, 885_000);
    assert_eq!(openai.hosting, Some(Hosting::Commercial));
    assert_eq!(openai.region.as_deref(), Some("us"));

    // Self-hosted and retired backends list at what they billed.
    assert_eq!(
        (charges[0].billed_nusd, charges[0].list_nusd),
        (12_345, 12_345)
    );
    assert_eq!((charges[2].billed_nusd, charges[2].list_nusd), (9, 9));
    assert_eq!((charges[3].billed_nusd, charges[3].list_nusd), (9, 9));
    assert_eq!(
        (charges[4].billed_nusd, charges[4].list_nusd),
        (1_000, 1_000)
    );
    assert_eq!(
        (charges[4].hosting, charges[4].region.as_deref()),
        (None, None)
    );
}

#[test]
fn tags_are_those_every_request_of_the_charge_shares() {
    let db = TempLedger::with("tags", &ledger());
    let (from, to) = period();
    let charges = query(&db.conn, &config(), from, to).unwrap();
    let tags: Vec<String> = charges
        .iter()
        .map(|c| serde_json::to_string(&c.tags).unwrap())
        .collect();
    assert_eq!(
        tags,
        vec![
            r#"{"department":"rnd","project":"alpha"}"#,
            // Projects alpha and beta: only the team's tag is common.
            r#"{"department":"rnd"}"#,
            // Projects x and y, no team tags.
            "{}",
            r#"{"project":"y"}"#,
            "{}",
            r#"{"department":"rnd","project":"alpha"}"#,
        ]
    );
}

#[test]
fn csv_rows_carry_exact_money_hour_bounds_and_quoted_tags() {
    let db = TempLedger::with("csv", &ledger());
    let (from, to) = period();
    let csv = export(&db.conn, &config(), from, to).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 7, "{csv}");
    assert_eq!(lines[0], COLUMNS.join(","));
    assert_eq!(
        lines[1],
        "0.000012345,0.000012345,0.000012345,0.000012345,USD,tollgate,Tollgate,\
         2026-11-01T00:00:00Z,2026-12-01T00:00:00Z,2026-11-22T10:00:00Z,2026-11-22T11:00:00Z,\
         Usage,,Usage-Based,LLM inference: meta-llama/Llama-3.1-8B-Instruct on llama,,\
         Tollgate,Tollgate,Tollgate,Tollgate,Tollgate,llama,AI and Machine Learning,Generative AI,\
         llama/meta-llama/Llama-3.1-8B-Instruct,meta-llama/Llama-3.1-8B-Instruct,eu,\
         meta-llama/Llama-3.1-8B-Instruct,llama/meta-llama/Llama-3.1-8B-Instruct,\
         1000,Tokens,0.001000,1000000 Tokens,\"{\"\"department\"\":\"\"rnd\"\",\"\"project\"\":\"\"alpha\"\"}\",\
         search,search,k1,self_hosted,1,300,700,0"
    );
    assert_eq!(
        lines[2],
        "0.000150000,0.000150000,0.000885000,0.000150000,USD,tollgate,Tollgate,\
         2026-11-01T00:00:00Z,2026-12-01T00:00:00Z,2026-11-22T10:00:00Z,2026-11-22T11:00:00Z,\
         Usage,,Usage-Based,LLM inference: gpt-4o-mini on openai,,\
         Tollgate,Tollgate,openai,Tollgate,openai,openai,AI and Machine Learning,Generative AI,\
         openai/gpt-4o-mini,gpt-4o-mini,us,gpt-4o-mini,openai/gpt-4o-mini,\
         3600,Tokens,0.003600,1000000 Tokens,\"{\"\"department\"\":\"\"rnd\"\"}\",\
         search,search,k1,commercial,2,3000,600,200"
    );
    assert!(
        lines[5].contains(",Tollgate,Tollgate,Not Applicable,Tollgate,unknown,retired,")
            && lines[5].contains(",retired/gpt-4o,gpt-4o,,gpt-4o,retired/gpt-4o,200,")
            && lines[5].ends_with(",support,support,k1,unknown,1,100,100,0"),
        "{}",
        lines[5]
    );
    assert!(
        lines[6].contains(",2026-11-22T11:00:00Z,2026-11-22T12:00:00Z,"),
        "{}",
        lines[6]
    );
}

/// A charge's row as column → value.
fn row(focus: &Focus, charge: &Charge) -> BTreeMap<&'static str, String> {
    COLUMNS.into_iter().zip(fields(focus, charge)).collect()
}

#[test]
fn the_operator_sells_and_bills_and_the_backend_hosts() {
    let config = crate::config::parse(
        &format!(
            "{CONFIG}\n[focus]\nbilling_account_id = \"cc-42\"\nbilling_account_name = \"R&D\"\n\
             provider_name = \"Acme AI Platform\"\nhost_provider_name = \"Acme DC\"\n"
        ),
        "focus.toml",
        &|_| None,
    )
    .unwrap();
    let db = TempLedger::with("who", &ledger());
    let (from, to) = period();
    let charges = query(&db.conn, &config, from, to).unwrap();
    let who = |c: &Charge| {
        let r = row(&config.focus, c);
        [
            "BillingAccountId",
            "BillingAccountName",
            "InvoiceIssuerName",
            "ServiceProviderName",
            "ProviderName",
            "HostProviderName",
            "PublisherName",
            "x_Hosting",
        ]
        .map(|col| r[col].clone())
    };
    // Self-hosted: the operator's own inference, on the GPUs `host_provider_name` runs.
    assert_eq!(
        who(&charges[0]),
        [
            "cc-42",
            "R&D",
            "Acme AI Platform",
            "Acme AI Platform",
            "Acme AI Platform",
            "Acme DC",
            "Acme AI Platform",
            "self_hosted"
        ]
    );
    // Commercial: the operator resells what the backend produced and hosted.
    assert_eq!(
        who(&charges[1]),
        [
            "cc-42",
            "R&D",
            "Acme AI Platform",
            "Acme AI Platform",
            "Acme AI Platform",
            "openai",
            "openai",
            "commercial"
        ]
    );
    // Gone from the config: still sold and billed by the operator; who ran it is unknown.
    assert_eq!(
        who(&charges[4]),
        [
            "cc-42",
            "R&D",
            "Acme AI Platform",
            "Acme AI Platform",
            "Acme AI Platform",
            "Not Applicable",
            "unknown",
            "unknown"
        ]
    );
}

#[test]
fn every_row_is_usage_at_contract_price_on_no_invoice_with_its_key() {
    let db = TempLedger::with("usage", &ledger());
    let (from, to) = period();
    let config = config();
    for c in query(&db.conn, &config, from, to).unwrap() {
        let r = row(&config.focus, &c);
        assert_eq!(
            (&*r["ChargeCategory"], &*r["ChargeFrequency"]),
            ("Usage", "Usage-Based")
        );
        // Null: no correction, no invoice id.
        assert_eq!((&*r["ChargeClass"], &*r["InvoiceId"]), ("", ""));
        assert_eq!(r["ContractedCost"], r["BilledCost"]);
        assert_eq!(r["EffectiveCost"], r["BilledCost"]);
        assert_eq!(r["PricingUnit"], "1000000 Tokens");
        assert_eq!(r["ServiceSubcategory"], "Generative AI");
        assert_eq!(r["SkuId"], c.model);
        assert_eq!(r["SkuPriceId"], format!("{}/{}", c.backend, c.model));
        assert_eq!((&*r["x_PrincipalId"], &*r["x_Team"]), (&*c.team, &*c.team));
        assert_eq!(r["x_CredentialId"], c.key_id);
    }
}

#[test]
fn the_billing_period_is_the_calendar_month_of_the_charge() {
    // 2026-12-31T23:30:00Z and 2027-01-01T00:00:00Z: the same night, two billing periods.
    const NEW_YEAR: i64 = 1_798_761_600_000_000;
    let records = [NEW_YEAR - 30 * MIN, NEW_YEAR]
        .map(|at| tokens(rec(at, "search", Some("llama"), LLAMA, "{}"), 1, 1, 1));
    let db = TempLedger::with("months", &records);
    let config = config();
    let periods: Vec<[String; 4]> = query(&db.conn, &config, None, None)
        .unwrap()
        .iter()
        .map(|c| {
            let r = row(&config.focus, c);
            [
                "BillingPeriodStart",
                "BillingPeriodEnd",
                "ChargePeriodStart",
                "ChargePeriodEnd",
            ]
            .map(|col| r[col].clone())
        })
        .collect();
    assert_eq!(
        periods,
        vec![
            [
                "2026-12-01T00:00:00Z",
                "2027-01-01T00:00:00Z",
                "2026-12-31T23:00:00Z",
                "2027-01-01T00:00:00Z"
            ],
            [
                "2027-01-01T00:00:00Z",
                "2027-02-01T00:00:00Z",
                "2027-01-01T00:00:00Z",
                "2027-01-01T01:00:00Z"
            ],
        ]
    );
}

#[test]
fn a_commercial_backend_at_the_catalog_price_lists_at_what_it_billed() {
    // gpt-4o has no price of its own on `openai`: metering bills it at the catalog price.
    let price = Catalog::builtin().price("gpt-4o").unwrap();
    let records: Vec<Record> = (0..50u64)
        .map(|i| {
            let usage = Usage {
                prompt: 17 + i * 31,
                completion: 3 + i * 7,
                cached: i % 5,
                cache_write: 0,
                cache_write_1h: 0,
                reasoning: 0,
                source: TokenSource::Upstream,
            };
            let egress = 1_000 + i * 997;
            Record {
                cached_tokens: Some(usage.cached),
                egress_bytes: egress,
                ..tokens(
                    rec(
                        H0 + i as i64 * MIN / 2,
                        "search",
                        Some("openai"),
                        "gpt-4o",
                        "{}",
                    ),
                    usage.prompt,
                    usage.completion,
                    meter::cost_nusd(Some(&price), &usage, egress, Some(0.09)),
                )
            }
        })
        .collect();
    let db = TempLedger::with("catalog", &records);
    let charges = query(&db.conn, &config(), None, None).unwrap();
    assert_eq!(charges.len(), 1);
    let billed: i64 = records.iter().map(|r| r.cost_nusd).sum();
    assert_eq!(charges[0].billed_nusd, billed);
    assert_eq!(charges[0].list_nusd, billed, "to the nano-dollar");
}

#[test]
fn pricing_quantity_is_exact_millions() {
    assert_eq!(per_million(0), "0.000000");
    assert_eq!(per_million(1234), "0.001234");
    assert_eq!(per_million(2_500_000), "2.500000");
}

#[test]
fn an_empty_period_is_a_header_alone() {
    let db = TempLedger::with("empty", &ledger());
    let csv = export(&db.conn, &config(), Some(0), Some(1)).unwrap();
    assert_eq!(csv, format!("{}\n", COLUMNS.join(",")));
}
