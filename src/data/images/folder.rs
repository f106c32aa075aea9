//! ImageFolder: `DIR/train/<class>/*.JPEG` and `DIR/val/<class>/*.JPEG`, as torchvision's
//! `ImageFolder` reads ImageNet prepared the usual way (one folder per WordNet id).
//!
//! Class `i` is the `i`-th class folder name in sorted (byte) order, as torchvision sorts
//! them; files are read in sorted name order. Only `.jpeg`, `.jpg` and `.png` files (any
//! case) directly inside a class folder are images; other files (`.DS_Store`, ...) and
//! nested folders are ignored. A class folder without images is an error naming it: an
//! empty class would silently shift every later label.

use super::{ImageSource, Rgb8, Split};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The file extensions read as images (compared ignoring case).
pub const EXTENSIONS: [&str; 3] = ["jpeg", "jpg", "png"];

/// One split of an ImageFolder tree.
pub struct ImageFolder {
    classes: Vec<String>,
    files: Vec<(PathBuf, u32)>,
}

fn sorted_entries(dir: &Path) -> Result<Vec<std::fs::DirEntry>> {
    let mut entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list '{}'", dir.display()))?
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("cannot list '{}'", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    Ok(entries)
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

impl ImageFolder {
    /// Lists `dir/train` or `dir/val` (only file names: nothing is decoded until loaded).
    pub fn open(dir: &Path, split: Split) -> Result<Self> {
        let root = dir.join(split.name());
        if !root.is_dir() {
            bail!(
                "image folder '{}' has no '{}' folder (expected {}/{}/<class>/*.JPEG)",
                dir.display(),
                split.name(),
                dir.display(),
                split.name()
            );
        }
        let mut classes = Vec::new();
        let mut files = Vec::new();
        for entry in sorted_entries(&root)? {
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            let label = classes.len() as u32;
            let before = files.len();
            for file in sorted_entries(&path)? {
                let file = file.path();
                if file.is_file() && is_image(&file) {
                    files.push((file, label));
                }
            }
            if files.len() == before {
                bail!(
                    "class folder '{}' holds no image (.jpeg, .jpg or .png); remove it or add \
                     its images, since an empty class shifts every later label",
                    path.display()
                );
            }
            classes.push(entry.file_name().to_string_lossy().into_owned());
        }
        if classes.is_empty() {
            bail!("image folder '{}' has no class folders", root.display());
        }
        Ok(Self { classes, files })
    }

    /// The path of image `index`.
    pub fn path(&self, index: usize) -> &Path {
        &self.files[index].0
    }
}

impl ImageSource for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn num_classes(&self) -> usize {
        self.classes.len()
    }

    fn class_names(&self) -> Option<Vec<String>> {
        Some(self.classes.clone())
    }

    fn load(&self, index: usize) -> Result<(Rgb8, u32)> {
        let Some((path, label)) = self.files.get(index) else {
            bail!("image {index} is past the end ({})", self.files.len());
        };
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read '{}'", path.display()))?;
        let image = Rgb8::decode(&bytes).with_context(|| format!("'{}'", path.display()))?;
        Ok((image, *label))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{check_same_classes, open_pair, synthetic::SyntheticImages};
    use super::*;

    /// Writes `counts[c]` images per class `c` named `n0000c` under `dir/split`.
    fn write_split(dir: &Path, split: &str, classes: &[&str], per_class: usize) {
        let source = SyntheticImages::new(Split::Train, 64, 24, 1);
        for (c, class) in classes.iter().enumerate() {
            let folder = dir.join(split).join(class);
            std::fs::create_dir_all(&folder).unwrap();
            for i in 0..per_class {
                let img = source.load(c + 10 * i).unwrap().0;
                let (name, format) = if i % 2 == 0 {
                    (format!("img_{i}.JPEG"), image::ImageFormat::Jpeg)
                } else {
                    (format!("img_{i}.png"), image::ImageFormat::Png)
                };
                let bytes = super::super::tests::encode(&img, format);
                std::fs::write(folder.join(name), bytes).unwrap();
            }
        }
    }

    #[test]
    fn reads_sorted_classes_and_checks_splits() {
        let dir = tempfile::tempdir().unwrap();
        write_split(dir.path(), "train", &["n02", "n01", "n03"], 3);
        write_split(dir.path(), "val", &["n01", "n02", "n03"], 1);
        std::fs::write(dir.path().join("train/n01/notes.txt"), "not an image").unwrap();
        std::fs::write(dir.path().join("train/README"), "ignored").unwrap();
        let train = ImageFolder::open(dir.path(), Split::Train).unwrap();
        assert_eq!(train.len(), 9);
        assert_eq!(train.class_names().unwrap(), ["n01", "n02", "n03"]);
        let labels: Vec<u32> = (0..9).map(|i| train.files[i].1).collect();
        assert_eq!(labels, [0, 0, 0, 1, 1, 1, 2, 2, 2]);
        let (img, label) = train.load(4).unwrap();
        assert_eq!((img.width, img.height, label), (24, 24, 1));
        assert!(train.path(0).ends_with("n01/img_0.JPEG"));
        let spec = format!("imagefolder:{}", dir.path().display())
            .parse::<crate::data::DataSpec>()
            .unwrap();
        let (t, v) = open_pair(&spec).unwrap();
        assert_eq!((t.len(), v.len(), v.num_classes()), (9, 3, 3));

        // A corrupt file is an error naming it (the pipeline skips it).
        std::fs::write(dir.path().join("train/n02/img_0.JPEG"), b"garbage").unwrap();
        let err = format!("{:#}", train.load(3).unwrap_err());
        assert!(
            err.contains("n02/img_0.JPEG") && err.contains("cannot decode"),
            "{err}"
        );

        // Val with a class train lacks.
        write_split(dir.path(), "val", &["n04"], 1);
        let err = open_pair(&spec).err().unwrap().to_string();
        assert!(err.contains("train has 3 classes and val 4"), "{err}");
        assert!(err.contains("only in val: [\"n04\"]"), "{err}");
        let val = ImageFolder::open(dir.path(), Split::Val).unwrap();
        assert!(check_same_classes(&spec, &train, &val).is_err());

        // An empty class folder is an error naming it.
        std::fs::create_dir_all(dir.path().join("train/n00")).unwrap();
        std::fs::write(dir.path().join("train/n00/readme.txt"), "x").unwrap();
        let err = ImageFolder::open(dir.path(), Split::Train)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("train/n00") && err.contains("holds no image"),
            "{err}"
        );

        let missing = ImageFolder::open(&dir.path().join("nope"), Split::Train);
        assert!(missing
            .err()
            .unwrap()
            .to_string()
            .contains("has no 'train' folder"));
    }
}
