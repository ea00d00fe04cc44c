//! OCI image archives from files on this machine, for the e2e suite's real
//! node: there is no registry and no image builder here, so the node's
//! containerd imports archives written by [`write_image`].
//!
//! An image is one uncompressed layer holding the given files (each at the
//! path it is given, with symbolic links to it), a few empty directories
//! every container expects and an `/etc/passwd`; `ctr images import` reads
//! the archive as an OCI image layout.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde_json::json;
use sha2::{Digest as _, Sha256};

/// One file of an image: `source` on this machine, stored at `path`
/// (absolute), with symbolic links `links` to it.
#[derive(Clone, Debug)]
pub struct ImageFile {
    /// The file on this machine.
    pub source: PathBuf,
    /// Where it is in the image.
    pub path: String,
    /// Absolute paths in the image that link to `path`.
    pub links: Vec<String>,
}

impl ImageFile {
    /// `source` at `path`, without links.
    pub fn new(source: impl Into<PathBuf>, path: &str) -> Self {
        Self {
            source: source.into(),
            path: path.to_string(),
            links: Vec::new(),
        }
    }
}

/// What an image runs and as whom.
#[derive(Clone, Debug)]
pub struct ImageConfig {
    /// `name:tag`, e.g. `localhost/volplane:e2e`.
    pub name: String,
    /// The entrypoint.
    pub entrypoint: Vec<String>,
    /// `uid:gid`, or empty for root.
    pub user: String,
}

/// Writes the OCI archive of an image `config` holding `files` to `out`;
/// returns the manifest's digest.
pub fn write_image(out: &Path, config: &ImageConfig, files: &[ImageFile]) -> anyhow::Result<String> {
    let layer = layer(files)?;
    let layer_digest = digest(&layer);
    let image_config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": config.entrypoint,
            "Env": ["PATH=/usr/local/bin:/bin:/usr/bin:/sbin:/usr/sbin"],
            "WorkingDir": "/",
            "User": config.user,
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }))?;
    let config_digest = digest(&image_config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": image_config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer.len()}],
    }))?;
    let manifest_digest = digest(&manifest);
    let tag = config.name.rsplit_once(':').map_or("latest", |(_, tag)| tag);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": manifest_digest, "size": manifest.len(),
                       "annotations": {"io.containerd.image.name": config.name,
                                       "org.opencontainers.image.ref.name": tag}}],
    }))?;
    let file = std::fs::File::create(out).with_context(|| format!("create {}", out.display()))?;
    let mut archive = tar::Builder::new(file);
    let blob = |digest: &str| format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    for (path, data) in [
        (
            "oci-layout".to_string(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.as_slice(),
        ),
        ("index.json".to_string(), &index),
        (blob(&layer_digest), &layer),
        (blob(&config_digest), &image_config),
        (blob(&manifest_digest), &manifest),
    ] {
        append(&mut archive, &path, 0o644, data)?;
    }
    archive.into_inner()?.sync_all()?;
    Ok(manifest_digest)
}

/// The layer: directories, `files` with their links, `/etc/passwd`.
fn layer(files: &[ImageFile]) -> anyhow::Result<Vec<u8>> {
    let mut layer = tar::Builder::new(Vec::new());
    let mut directories = std::collections::BTreeSet::new();
    let mut add_directory = |layer: &mut tar::Builder<Vec<u8>>, path: &str| -> anyhow::Result<()> {
        let mut prefix = String::new();
        for part in path.trim_matches('/').split('/').filter(|p| !p.is_empty()) {
            prefix = if prefix.is_empty() {
                part.to_string()
            } else {
                format!("{prefix}/{part}")
            };
            if directories.insert(prefix.clone()) {
                let mut header = tar::Header::new_ustar();
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(if prefix == "tmp" { 0o1777 } else { 0o755 });
                header.set_size(0);
                layer.append_data(&mut header, format!("{prefix}/"), std::io::empty())?;
            }
        }
        Ok(())
    };
    for directory in ["tmp", "etc", "proc", "sys", "dev", "var", "run"] {
        add_directory(&mut layer, directory)?;
    }
    for file in files {
        let data = std::fs::read(&file.source).with_context(|| format!("read {}", file.source.display()))?;
        let path = file.path.trim_start_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            add_directory(&mut layer, parent)?;
        }
        append(&mut layer, path, 0o755, &data)?;
        for link in &file.links {
            let link = link.trim_start_matches('/');
            if let Some((parent, _)) = link.rsplit_once('/') {
                add_directory(&mut layer, parent)?;
            }
            let mut header = tar::Header::new_ustar();
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_mode(0o777);
            header.set_size(0);
            layer.append_link(&mut header, link, format!("/{path}"))?;
        }
    }
    let passwd = b"root:x:0:0:root:/:/bin/sh\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n\
                   nobody:x:65534:65534:nobody:/:/sbin/nologin\n";
    append(&mut layer, "etc/passwd", 0o644, passwd)?;
    Ok(layer.into_inner()?)
}

fn append<W: std::io::Write>(archive: &mut tar::Builder<W>, path: &str, mode: u32, data: &[u8]) -> anyhow::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_size(data.len() as u64);
    header.set_mode(mode);
    header.set_entry_type(tar::EntryType::Regular);
    archive
        .append_data(&mut header, path, data)
        .with_context(|| format!("add {path} to the image"))
}

fn digest(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// The shared libraries `binary` loads, as `ldd` lists them (the dynamic
/// loader included); empty for a static binary.
pub fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let output = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .context("run ldd")?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text
        .lines()
        .filter_map(|line| {
            // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or `/lib64/ld-linux-x86-64.so.2 (0x…)`
            let path = line.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_archive_is_an_oci_layout_whose_digests_match_its_blobs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("tool");
        std::fs::write(&source, b"#!/bin/sh\necho hi\n").expect("write");
        let out = dir.path().join("image.tar");
        let config = ImageConfig {
            name: "localhost/tool:e2e".into(),
            entrypoint: vec!["/bin/tool".into()],
            user: "65532:65532".into(),
        };
        let file = ImageFile {
            source,
            path: "/bin/tool".into(),
            links: vec!["/bin/alias".into()],
        };
        let manifest_digest = write_image(&out, &config, &[file]).expect("image");

        let mut entries = ArchiveEntries::read(&out);
        let index: serde_json::Value = serde_json::from_slice(&entries.take("index.json")).expect("index");
        assert_eq!(index["manifests"][0]["digest"], manifest_digest);
        assert_eq!(
            index["manifests"][0]["annotations"]["io.containerd.image.name"],
            "localhost/tool:e2e"
        );
        let manifest: serde_json::Value = serde_json::from_slice(&entries.blob(&manifest_digest)).expect("manifest");
        let image_config: serde_json::Value =
            serde_json::from_slice(&entries.blob(manifest["config"]["digest"].as_str().expect("config")))
                .expect("config");
        assert_eq!(image_config["config"]["User"], "65532:65532");
        let layer_digest = manifest["layers"][0]["digest"].as_str().expect("layer").to_string();
        assert_eq!(image_config["rootfs"]["diff_ids"][0], layer_digest);
        let layer = entries.blob(&layer_digest);
        let mut paths = Vec::new();
        for entry in tar::Archive::new(layer.as_slice()).entries().expect("layer entries") {
            let entry = entry.expect("entry");
            let path = entry.path().expect("path").to_string_lossy().into_owned();
            let link = entry
                .link_name()
                .expect("link")
                .map(|l| l.to_string_lossy().into_owned());
            paths.push((path, link));
        }
        assert!(paths.contains(&("bin/tool".into(), None)), "{paths:?}");
        assert!(
            paths.contains(&("bin/alias".into(), Some("/bin/tool".into()))),
            "{paths:?}"
        );
        assert!(paths.iter().any(|(p, _)| p == "etc/passwd"), "{paths:?}");
    }

    #[test]
    fn shared_libraries_of_a_dynamic_binary_include_its_loader_and_libc() {
        let libraries = shared_libraries(Path::new("/bin/sh")).expect("ldd");
        assert!(
            libraries.iter().any(|l| l.to_string_lossy().contains("ld-linux")),
            "{libraries:?}"
        );
        assert!(
            libraries.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libraries:?}"
        );
    }

    /// The archive's entries by path; blobs checked against their digests.
    struct ArchiveEntries(std::collections::BTreeMap<String, Vec<u8>>);

    impl ArchiveEntries {
        fn read(path: &Path) -> Self {
            let mut archive = tar::Archive::new(std::fs::File::open(path).expect("open"));
            let mut entries = std::collections::BTreeMap::new();
            for entry in archive.entries().expect("entries") {
                let mut entry = entry.expect("entry");
                let name = entry.path().expect("path").to_string_lossy().into_owned();
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut entry, &mut data).expect("read");
                entries.insert(name, data);
            }
            Self(entries)
        }

        fn take(&mut self, name: &str) -> Vec<u8> {
            self.0.remove(name).unwrap_or_else(|| panic!("{name} missing"))
        }

        fn blob(&mut self, digest: &str) -> Vec<u8> {
            let data = self.take(&format!("blobs/sha256/{}", digest.trim_start_matches("sha256:")));
            assert_eq!(super::digest(&data), digest, "blob content does not match its digest");
            data
        }
    }
}
