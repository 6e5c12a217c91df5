//! `outbox-relay bench` works end to end: a small run of both modes drains
//! its backlog (the bench fails unless the outbox empties), every live row
//! reaches the consumer, and the figures it prints are written as JSON with
//! each limit measured. Speed itself is never asserted here.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_bench_of_both_modes_drains_everything_and_writes_its_figures() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let mut cmd = relay_binary();
    cmd.args(["bench", "--rows", "2000", "--rate", "200", "--live", "2s"])
        .arg("--json")
        .arg(&json);
    let mock = match std::env::var("OUTBOX_TEST_BROKERS") {
        Ok(brokers) => {
            cmd.args(["--brokers", &brokers]);
            false
        }
        Err(_) => {
            // The lanes drains set the mock brokers' round trip.
            cmd.args(["--lanes", "1,2", "--lanes-rows", "1000"]);
            true
        }
    };
    let output = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .expect("the bench finishes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the bench failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("targets:"), "{stdout}");

    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let modes = report["modes"].as_array().unwrap();
    let names: Vec<&str> = modes.iter().map(|m| m["mode"].as_str().unwrap()).collect();
    assert_eq!(names, ["poll", "tail"]);
    for mode in modes {
        let name = mode["mode"].as_str().unwrap();
        let number = |v: &Value| {
            v.as_f64()
                .unwrap_or_else(|| panic!("{name}: {v} is not a number"))
        };
        assert_eq!(mode["drain"]["rows"], 2000, "{name}");
        assert!(number(&mode["drain"]["rows_per_sec"]) > 0.0, "{name}");
        assert!(number(&mode["drain"]["relay_peak_rss_mb"]) > 0.0, "{name}");
        assert!(
            number(&mode["limits"]["insert_rows_per_sec"]) > 0.0,
            "{name}"
        );
        assert!(
            number(&mode["limits"]["producer_records_per_sec"]) > 0.0,
            "{name}"
        );
        let recvlogical = &mode["limits"]["pg_recvlogical_rows_per_sec"];
        match name {
            "tail" => {
                assert!(number(recvlogical) > 0.0);
                assert_eq!(mode["drain"]["ratio_to"], "pg_recvlogical");
            }
            _ => {
                assert!(recvlogical.is_null());
                assert_eq!(mode["drain"]["ratio_to"], "insert");
            }
        }
        // Two seconds at 200 rows/s after the warm-up, every row received
        // and every one acknowledged in the measured window.
        let live = &mode["live"];
        assert_eq!(live["rows"], 400, "{name}: {live}");
        assert_eq!(live["acks_counted"], 400, "{name}: {live}");
        for (p50, p99, max) in [
            ("ack_p50_ms", "ack_p99_ms", "ack_max_ms_at_most"),
            ("consumer_p50_ms", "consumer_p99_ms", "consumer_max_ms"),
        ] {
            let (p50, p99, max) = (number(&live[p50]), number(&live[p99]), number(&live[max]));
            assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{name}: {live}");
        }
    }
    if mock {
        let runs = report["lanes"]["runs"].as_array().unwrap();
        let lanes: Vec<u64> = runs.iter().map(|r| r["lanes"].as_u64().unwrap()).collect();
        assert_eq!(lanes, [1, 2]);
        for run in runs {
            assert!(run["rows_per_sec"].as_f64().unwrap() > 0.0, "{run}");
        }
        assert_eq!(report["lanes"]["rows"], 1000);
    }
}
