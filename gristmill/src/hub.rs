//! Models by Hugging Face id: `--model Qwen/Qwen3-0.6B` (an HF checkpoint: config, tokenizer,
//! safetensors weights) or `--model org/name:file.gguf` (one file of a GGUF repository),
//! resolved from the local Hugging Face cache (`$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`, the layout `huggingface-cli` and transformers write) and downloaded
//! into it with a progress bar when missing — unless `HF_HUB_OFFLINE=1`. `HF_TOKEN` (or the
//! token `huggingface-cli login` saved) authenticates; `HF_ENDPOINT` names another hub.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo};

/// A model named by id: the repository and, for a GGUF repository, the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubModel {
    pub repo: String,
    pub file: Option<String>,
}

/// `org/name` or `org/name:file.gguf`; `None` for anything else (a path).
pub fn parse_id(spec: &str) -> Option<HubModel> {
    let (repo, file) = match spec.split_once(':') {
        Some((repo, file)) if file.ends_with(".gguf") && !file.contains("..") => {
            (repo, Some(file.to_string()))
        }
        Some(_) => return None,
        None => (spec, None),
    };
    let (org, name) = repo.split_once('/')?;
    // `models/x.gguf` that does not exist is a mistyped path, not a repository.
    if [".gguf", ".safetensors", ".json", ".bin"]
        .iter()
        .any(|ext| name.ends_with(ext))
    {
        return None;
    }
    let ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (ok(org) && ok(name)).then(|| HubModel {
        repo: repo.to_string(),
        file,
    })
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"))
}

/// The local path of `--model`: the path itself when it exists (or is not an id), else the
/// model fetched from the Hugging Face cache or hub.
pub fn resolve_model(spec: &Path) -> Result<PathBuf> {
    let Some(model) = spec.to_str().filter(|_| !spec.exists()).and_then(parse_id) else {
        return Ok(spec.to_path_buf());
    };
    let cache = Cache::from_env();
    let cached = cache.repo(Repo::model(model.repo.clone()));
    let folder = cache
        .path()
        .join(Repo::model(model.repo.clone()).folder_name());
    let api = if offline() {
        None
    } else {
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| cache.token());
        Some(
            ApiBuilder::from_env()
                .with_token(token)
                .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .build()
                .context("cannot set up the Hugging Face hub client")?,
        )
    };
    // One file: from the cache, else downloaded; `Ok(None)` for an optional file that is
    // missing.
    let fetch = |file: &str, optional: bool| -> Result<Option<PathBuf>> {
        if let Some(p) = cached.get(file) {
            return Ok(Some(p));
        }
        let Some(api) = &api else {
            if optional {
                return Ok(None);
            }
            bail!(
                "model {}: no such path here, and {file} is not in the Hugging Face cache (looked \
                 in {}); HF_HUB_OFFLINE forbids downloading it",
                model.repo,
                folder.display()
            );
        };
        match api.model(model.repo.clone()).get(file) {
            Ok(p) => Ok(Some(p)),
            Err(_) if optional => Ok(None),
            Err(e) => Err(anyhow::anyhow!(e)).with_context(|| {
                format!(
                    "model {}: cannot download {file} from the Hugging Face hub (the cache at {} \
                     does not hold it)",
                    model.repo,
                    folder.display()
                )
            }),
        }
    };
    if let Some(file) = &model.file {
        return Ok(fetch(file, false)?.unwrap_or_default());
    }
    let config = fetch("config.json", false)?.unwrap_or_default();
    fetch("tokenizer.json", false)?;
    for optional in ["tokenizer_config.json", "generation_config.json"] {
        fetch(optional, true)?;
    }
    if fetch("model.safetensors", true)?.is_none() {
        let index = fetch("model.safetensors.index.json", true)?.with_context(|| {
            format!(
                "model {}: neither model.safetensors nor model.safetensors.index.json is there",
                model.repo
            )
        })?;
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", index.display()))?;
        let mut shards: Vec<&str> = json["weight_map"]
            .as_object()
            .map(|m| m.values().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        shards.sort_unstable();
        shards.dedup();
        for shard in shards {
            fetch(shard, false)?;
        }
    }
    // Every file of one revision lives in the same snapshot folder.
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_paths_are_told_apart() {
        assert_eq!(
            parse_id("Qwen/Qwen3-0.6B"),
            Some(HubModel {
                repo: "Qwen/Qwen3-0.6B".into(),
                file: None
            })
        );
        assert_eq!(
            parse_id("unsloth/Qwen3-0.6B-GGUF:Qwen3-0.6B-Q4_K_M.gguf"),
            Some(HubModel {
                repo: "unsloth/Qwen3-0.6B-GGUF".into(),
                file: Some("Qwen3-0.6B-Q4_K_M.gguf".into())
            })
        );
        for path in [
            "model.gguf",
            "./a/b",
            "/abs/path",
            "a/b/c",
            "org/",
            "../x",
            "org/n:x.bin",
            "models/x.gguf",
        ] {
            assert_eq!(parse_id(path), None, "{path}");
        }
    }
}
