//! Files: the object store of uploads and results, and their OpenAI metadata in KV.

use super::*;

impl Coordinator {
    /// Stores the bytes `data` yields as object `id` (streamed in chunks; nothing of the
    /// file is held whole). Returns its size.
    pub async fn store_object(
        &self,
        id: &str,
        data: &mut (impl tokio::io::AsyncRead + Unpin),
    ) -> Result<u64> {
        self.lease.fence()?;
        let meta = object_store::ObjectMetadata {
            name: id.to_string(),
            // Fewer, larger chunks store a 30 MB file in a fraction of the time.
            chunk_size: Some(FILE_CHUNK),
            ..Default::default()
        };
        let info = self
            .objects
            .put(meta, data)
            .await
            .with_context(|| format!("storing file {id}"))?;
        Ok(info.size as u64)
    }

    /// Removes a stored object that never became a file (an upload refused after its bytes
    /// were stored).
    pub async fn discard_object(&self, id: &str) {
        if let Err(e) = self.objects.delete(id).await {
            tracing::warn!(file = id, error = %e, "could not remove the bytes of a refused upload");
        }
    }

    /// Makes stored object `id` a file of the Files API.
    pub async fn register_file(
        &self,
        id: String,
        filename: String,
        purpose: String,
        bytes: u64,
        owner: &str,
    ) -> Result<FileObject> {
        self.lease.fence()?;
        let meta = FileObject {
            id: id.clone(),
            object: "file".into(),
            bytes,
            created_at: now_s(),
            filename,
            purpose,
            status: "processed".into(),
            expires_at: None,
            status_details: None,
            owner: (owner != crate::tenants::DEFAULT_TENANT).then(|| owner.to_string()),
        };
        self.files_kv
            .put(&id, serde_json::to_vec(&meta)?.into())
            .await
            .with_context(|| format!("storing file {id}'s metadata"))?;
        Ok(meta)
    }

    pub async fn file(&self, id: &str) -> Result<Option<FileObject>> {
        if !valid_id(id) {
            return Ok(None);
        }
        Ok(match self.files_kv.get(id).await? {
            Some(v) => Some(serde_json::from_slice(&v)?),
            None => None,
        })
    }

    pub async fn list_files(&self) -> Result<Vec<FileObject>> {
        let mut keys = self.files_kv.keys().await?;
        let mut out = Vec::new();
        while let Some(k) = keys.next().await {
            if let Some(f) = self.file(&k?).await? {
                out.push(f);
            }
        }
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        Ok(out)
    }

    /// A file's bytes, to be read as a stream (a multi-gigabyte output is never held whole).
    pub async fn file_reader(&self, id: &str) -> Result<object_store::Object> {
        self.objects
            .get(id)
            .await
            .with_context(|| format!("reading file {id}"))
    }

    /// A batch that is still running on this input file, if any.
    pub fn batch_using(&self, file_id: &str) -> Option<String> {
        self.lock()
            .values()
            .find(|s| !s.rec.status.is_terminal() && s.rec.input_file_id == file_id)
            .map(|s| s.rec.id.clone())
    }

    pub async fn delete_file(&self, id: &str) -> Result<bool> {
        if self.file(id).await?.is_none() {
            return Ok(false);
        }
        self.lease.fence()?;
        self.files_kv.delete(id).await?;
        if let Err(e) = self.objects.delete(id).await {
            tracing::warn!(file = id, error = %e, "file data already gone");
        }
        Ok(true)
    }

    // ---------------------------------------------------------------- batches
}
