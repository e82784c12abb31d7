//! Report building blocks shared by the subcommands: histogram transport
//! between processes, percentile summaries, and writing JSON files.
//!
//! Histograms cross process boundaries as hdrhistogram's V2 serialization,
//! base64-encoded inside the child's one-line JSON report; the parent decodes
//! and adds them, which is exact (same bucket layout in every process).

use std::path::Path;

use anyhow::Context;
use base64::Engine;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;

/// Serializes a histogram (V2 format) and encodes it as base64.
pub fn encode_histogram(histogram: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(histogram, &mut bytes)
        .expect("serializing into a Vec cannot fail");
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decodes a histogram made by [`encode_histogram`].
pub fn decode_histogram(text: &str) -> anyhow::Result<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .context("histogram is not base64")?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|error| anyhow::anyhow!("histogram does not deserialize: {error:?}"))
}

/// Adds `from` into `into`, growing nothing (both share the bucket layout).
pub fn merge_histogram(into: &mut Histogram<u64>, from: &Histogram<u64>) -> anyhow::Result<()> {
    into.add(from)
        .map_err(|error| anyhow::anyhow!("histogram merge failed: {error:?}"))
}

/// A latency summary in milliseconds, from a histogram recorded in µs.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub min_ms: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    /// Summarizes a histogram of microseconds.
    pub fn from_us(histogram: &Histogram<u64>) -> Percentiles {
        if histogram.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: histogram.len(),
            min_ms: ms(histogram.min()),
            mean_ms: histogram.mean() / 1000.0,
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p90_ms: ms(histogram.value_at_quantile(0.90)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            p999_ms: ms(histogram.value_at_quantile(0.999)),
            max_ms: ms(histogram.max()),
        }
    }

    /// One line for the human summary.
    pub fn line(&self) -> String {
        if self.count == 0 {
            return "no samples".to_owned();
        }
        format!(
            "p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms  ({} samples)",
            self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms, self.count
        )
    }
}

/// Writes `value` as pretty JSON to `path`.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

/// A count with a thousands separator, for humans.
pub fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::track::latency_histogram;

    #[test]
    fn histograms_round_trip_and_merge_across_processes() {
        // Two "processes" record disjoint samples; the parent decodes and merges.
        let mut first = latency_histogram();
        let mut second = latency_histogram();
        for value in 1..=1000u64 {
            first.record(value).unwrap();
        }
        for value in 1001..=2000u64 {
            second.record(value * 10).unwrap();
        }
        let first_text = encode_histogram(&first);
        let second_text = encode_histogram(&second);
        let first_back = decode_histogram(&first_text).unwrap();
        assert_eq!(first_back, first, "round trip is exact");
        let mut merged = latency_histogram();
        merge_histogram(&mut merged, &first_back).unwrap();
        merge_histogram(&mut merged, &decode_histogram(&second_text).unwrap()).unwrap();
        assert_eq!(merged.len(), 2000);
        assert_eq!(merged.min(), 1);
        assert!(merged.equivalent(merged.max(), 20_000));
        assert!(merged.equivalent(merged.value_at_quantile(0.5), 1000));
        // The same as recording everything in one histogram.
        let mut single = latency_histogram();
        single.add(&first).unwrap();
        single.add(&second).unwrap();
        assert_eq!(single, merged);
        assert!(decode_histogram("not base64!").is_err());
        assert!(decode_histogram("AAAA").is_err());
    }

    #[test]
    fn percentiles_in_ms() {
        let mut histogram = latency_histogram();
        for value in 1..=100u64 {
            histogram.record(value * 1000).unwrap();
        }
        let summary = Percentiles::from_us(&histogram);
        assert_eq!(summary.count, 100);
        assert!((summary.p50_ms - 50.0).abs() < 0.1);
        assert!((summary.max_ms - 100.0).abs() < 0.1);
        assert_eq!(Percentiles::from_us(&latency_histogram()).count, 0);
    }

    #[test]
    fn thousands_separator() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(100_000), "100,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
