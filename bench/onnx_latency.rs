//! Single-review latency of a BERT bundle through sentiflow's runtime (tokenizers + ort), for
//! `bench/bert.py`, which runs Python ONNX Runtime on the same file and reviews in the same run.
//!
//! Usage: cargo bench --bench onnx_latency -- BUNDLE REVIEWS.jsonl REPEATS [cpu|cuda[:N]]
//! Prints one JSON line: the median seconds of each review, in input order.

use std::path::Path;
use std::time::Instant;

use sentiflow::models::bert::{BertModel, Device, Runtime};
use sentiflow::models::bundle::{Family, Manifest};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let (bundle, reviews, repeats, device) = match args.as_slice() {
        [b, r, n] => (b, r, n, Device::Cpu),
        [b, r, n, d] => (b, r, n, d.parse().expect("a device")),
        _ => {
            eprintln!("usage: onnx_latency BUNDLE REVIEWS.jsonl REPEATS [cpu|cuda[:N]]");
            std::process::exit(2);
        }
    };
    let dir = Path::new(bundle);
    let manifest = Manifest::read(dir).expect("a bundle");
    let Family::Bert {
        max_length, truncation, ..
    } = manifest.family
    else {
        panic!("{bundle} is not a BERT bundle");
    };
    let model = BertModel::load(dir, max_length, truncation, Runtime { threads: 0, device }).expect("the model loads");
    let texts: Vec<String> = std::fs::read_to_string(reviews)
        .expect("the reviews file")
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("JSON lines")["text"]
                .as_str()
                .expect("text")
                .to_string()
        })
        .collect();
    let repeats: usize = repeats.parse().expect("a number of repeats");
    for t in texts.iter().take(5) {
        model.predict_batch(&[t]).expect("warm-up");
    }
    let medians: Vec<f64> = texts
        .iter()
        .map(|t| {
            let mut times: Vec<f64> = (0..repeats)
                .map(|_| {
                    let start = Instant::now();
                    std::hint::black_box(model.predict_batch(&[t]).expect("prediction"));
                    start.elapsed().as_secs_f64()
                })
                .collect();
            times.sort_by(f64::total_cmp);
            times[times.len() / 2]
        })
        .collect();
    println!("{}", serde_json::json!(medians));
}
