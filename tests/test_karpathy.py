"""Karpathy's COCO split end to end: dataset_coco.json -> prepare -> train -> evaluate on "test".

The split file is built in Karpathy's schema from the shared val2017 sample
(50 of its images on disk with their real captions, and 10 images that are
not on disk, as a user with part of COCO has), naming the 2014 files as the
real one does; the photos are only under their 2017 names, which
load_karpathy falls back to. Splits are assigned by image id, so the test
knows which images each stage must use: train + restval to learn and build
the vocabulary from, val to early-stop on, test to evaluate.
"""

import json

import pytest

from captioning.vocab import clean_caption

SPLITS = ("train", "train", "restval", "val", "test")  # image i (by sorted id) gets SPLITS[i % 5]
ON_DISK, ABSENT = 50, 10


def karpathy_file(coco_val_dir, path):
    """Write dataset_coco.json; -> {image id: (split, [raw captions])} of the images on disk."""
    full = json.loads((coco_val_dir / "annotations" / "captions_val2017.json").read_text())
    captions = {}
    for annotation in full["annotations"]:
        captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
    on_disk = sorted(image["id"] for image in full["images"] if (coco_val_dir / "images" / image["file_name"]).is_file())
    absent = sorted(image["id"] for image in full["images"] if image["id"] not in set(on_disk))
    ids = sorted(on_disk[:ON_DISK] + absent[:ABSENT])
    images, expected = [], {}
    for number, cocoid in enumerate(ids):
        split = SPLITS[number % len(SPLITS)]
        images.append({"filepath": "val2014", "filename": f"COCO_val2014_{cocoid:012d}.jpg", "imgid": number,
                       "cocoid": cocoid, "split": split, "sentids": [],
                       "sentences": [{"raw": raw, "tokens": clean_caption(raw).split(), "imgid": number}
                                     for raw in captions[cocoid]]})
        if cocoid in on_disk:
            expected[str(cocoid)] = (split, captions[cocoid])
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return expected


@pytest.mark.slow
def test_karpathy_split_prepare_train_evaluate(coco_val_dir, mobilenet_weights, tmp_path, capsys):
    from captioning.data import load_prepared
    from captioning.fileio import work_paths
    from captioning.evaluate import evaluate_bundle
    from captioning.pipeline import train_pipeline

    split_file = tmp_path / "dataset_coco.json"
    expected = karpathy_file(coco_val_dir, split_file)
    assert {split for split, _ in expected.values()} == {"train", "restval", "val", "test"} and len(expected) == ON_DISK
    cache, bundle, lines = tmp_path / "work", tmp_path / "bundle", []

    train_pipeline("coco", coco_val_dir, encoder="mobilenet_v2", weights=mobilenet_weights, arch="merge",
                   out_dir=bundle, epochs=1, self_critical_epochs=0, cache_dir=cache, karpathy_split=split_file,
                   log=lines.append)

    # prepare: every image on disk, under its 2017 name, with the split and captions assigned
    prepared = load_prepared(work_paths(cache, "coco")["prepared"])
    captions = prepared.captions
    assert dict(zip(captions["image_id"], captions["split"])) == {key: split for key, (split, _) in expected.items()}
    assert captions.groupby("image_id")["caption"].apply(list).to_dict() == \
        {key: raws for key, (_, raws) in expected.items()}
    assert set(captions["file_name"]) == {f"{int(key):012d}.jpg" for key in expected}
    assert all(path.startswith(str(coco_val_dir.resolve() / "images")) for path in captions["image_path"])
    assert prepared.report["dropped_images"] == ABSENT and prepared.report["images_on_disk"] == ON_DISK
    assert prepared.report["vocabulary"]["built_from_splits"] == ["restval", "train"]
    learned = [word for key, (split, raws) in expected.items() if split in ("train", "restval")
               for raw in raws for word in clean_caption(raw).split()]
    assert set(prepared.vocab.words[4:]) == {word for word in learned if learned.count(word) >= 5}

    # train: on train + restval, early-stopping on val
    count = {split: sum(len(raws) for s, raws in expected.values() if s == split) for split in SPLITS}
    assert any(line.startswith(f"training on {count['train'] + count['restval']} captions, validating on "
                               f"{count['val']} (val)") for line in lines), lines
    settings = json.loads((bundle / "bundle.json").read_text())
    assert settings["train_splits"] == ["train", "restval"] and settings["validation_splits"] == ["val"]
    assert settings["metrics"]["epochs_run"] == 1 and "self_critical" not in settings["metrics"]

    # evaluate: the test images only, each captioned, scored against its own references
    capsys.readouterr()
    metrics = evaluate_bundle(bundle, "coco", coco_val_dir, "test", cache_dir=cache, karpathy_split=split_file,
                              meteor=False, beam_width=2)
    assert "caching" not in capsys.readouterr().err  # the test images' features came from train's cache
    test_ids = {key for key, (split, _) in expected.items() if split == "test"}
    assert metrics["split"] == "test" and metrics["images"] == len(test_ids) and not metrics["skipped_images"]
    assert metrics["karpathy_split"] == str(split_file)
    for name in ("BLEU-4", "CIDEr", "ROUGE_L"):
        assert 0.0 <= metrics["coco"][name] < 10.0
    written = json.loads((bundle / "eval-test" / "captions.json").read_text())
    assert {entry["id"] for entry in written} == test_ids
    for entry in written:
        assert entry["references"] == expected[entry["id"]][1]
        assert all(word in prepared.vocab for word in entry["caption"].split())  # one epoch: may be short
        assert entry["file"] == f"{int(entry['id']):012d}.jpg" and set(entry["scores"]) >= {"CIDEr", "BLEU-4"}
    assert json.loads((bundle / "eval-test" / "metrics.json").read_text())["images"] == len(test_ids)
