//! `--model` by Hugging Face id, offline: a cache laid out as `huggingface-cli` lays it out, and
//! a download from a local HTTP server that answers the hub's `resolve` paths.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use gristmill_testkit::fixture;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn batch(dir: &Path) -> PathBuf {
    let p = dir.join("in.jsonl");
    std::fs::write(
        &p,
        "{\"custom_id\":\"a\",\"method\":\"POST\",\"url\":\"/v1/completions\",\"body\":{\"model\":\"m\",\"prompt\":\"Hello\",\"max_tokens\":3}}\n",
    )
    .expect("write batch");
    p
}

/// `gristmill run` of a one-line batch on `model` with `env`.
fn run(dir: &Path, model: &str, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gristmill"));
    cmd.arg("run")
        .arg(batch(dir))
        .arg("-o")
        .arg(dir.join("out.jsonl"))
        .args(["--model", model])
        .env_remove("GRISTMILL_MODEL")
        .env_remove("HF_TOKEN")
        .env_remove("HF_ENDPOINT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("gristmill runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_model_id_is_found_in_the_hugging_face_cache_and_a_missing_one_says_where_it_looked() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = tmp.path().join("hub/models--test--tiny-qwen3");
    let snap = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snap).expect("snapshot");
    std::fs::create_dir_all(repo.join("refs")).expect("refs");
    std::fs::write(repo.join("refs/main"), COMMIT).expect("ref");
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny-qwen3").join(f), snap.join(f)).expect("copy");
    }
    let home = tmp.path().to_str().expect("utf-8");
    let env = [("HF_HOME", home), ("HF_HUB_OFFLINE", "1")];
    let o = run(tmp.path(), "test/tiny-qwen3", &env);
    assert!(o.status.success(), "{}", text(&o));
    assert!(tmp.path().join("out.jsonl").exists());

    let o = run(tmp.path(), "test/not-there", &env);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("test/not-there")
            && t.contains("models--test--not-there")
            && t.contains("HF_HUB_OFFLINE"),
        "{t}"
    );
}

/// Answers `GET /{repo}/resolve/main/{file}` for `files` as the hub does (ETag, X-Repo-Commit,
/// byte ranges); 404 for anything else. Serves until the test ends.
fn serve_hub(files: Vec<(String, Vec<u8>)>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut range = None;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some(r) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    let (a, b) = r.trim().split_once('-').unwrap_or(("0", ""));
                    range = Some((a.parse::<usize>().unwrap_or(0), b.parse::<usize>().ok()));
                }
            }
            let mut out = stream;
            let Some((_, body)) = files.iter().find(|(p, _)| *p == path) else {
                let _ = out.write_all(
                    b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
                continue;
            };
            let (status, start, end) = match range {
                Some((a, b)) => (
                    "206 Partial Content",
                    a,
                    b.map_or(body.len(), |b| b + 1).min(body.len()),
                ),
                None => ("200 OK", 0, body.len()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\netag: \"blob-{}\"\r\nx-repo-commit: {COMMIT}\r\n\
                 content-range: bytes {start}-{}/{}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len(),
                end.saturating_sub(1),
                body.len(),
                end - start
            );
            let _ = out.write_all(head.as_bytes());
            let _ = out.write_all(&body[start..end]);
        }
    });
    port
}

#[test]
fn a_gguf_file_of_a_repository_is_downloaded_into_the_cache_and_used() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let name = "tiny-qwen3-Q4_K_M.gguf";
    let bytes = std::fs::read(fixture(name)).expect("fixture");
    let port = serve_hub(vec![(
        format!("/test/kq/resolve/main/{name}"),
        bytes.clone(),
    )]);
    let home = tmp.path().to_str().expect("utf-8");
    let endpoint = format!("http://127.0.0.1:{port}");
    let model = format!("test/kq:{name}");
    let o = run(
        tmp.path(),
        &model,
        &[("HF_HOME", home), ("HF_ENDPOINT", &endpoint)],
    );
    assert!(o.status.success(), "{}", text(&o));
    let cached = tmp
        .path()
        .join("hub/models--test--kq/snapshots")
        .join(COMMIT)
        .join(name);
    assert_eq!(std::fs::read(&cached).expect("cached"), bytes);
    // Now it is in the cache: offline works.
    let o = run(
        tmp.path(),
        &model,
        &[("HF_HOME", home), ("HF_HUB_OFFLINE", "1")],
    );
    assert!(o.status.success(), "{}", text(&o));
}
