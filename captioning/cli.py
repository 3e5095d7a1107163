"""`python -m captioning COMMAND ...`: the pipeline from the shell.

Each command is a thin wrapper: it parses arguments, calls the library
function that the matching notebook teaches, and prints a short summary.

One error boundary, `main`: option values are checked before any work starts
(a bad one exits 2 with the usage line); any fault after that (a bad file, a
full disk, a folder it cannot write) is one line on stderr naming the file or
option and what to do, exit 1, no traceback (`--debug` or CAPTIONING_DEBUG=1
shows it). Ctrl-C says what was kept, and exits 130: every command resumes
or starts cleanly when run again. The choices of --dataset, --encoder, --arch and --preset are the package's
tables (data.DATASETS, encoders.ENCODERS, architectures.ARCHITECTURES,
training.PRESETS): register a new one there and the command line offers it.
"""

import argparse
import errno
import importlib
import os
import sys

from captioning import cluster


class TableNames:
    """The names in one of the package's tables, for argparse's `choices`, read only when
    argparse checks a value or prints help (the options give a `metavar`, so that merely
    declaring them reads nothing): `prepare` never imports TensorFlow, which the other tables need."""

    def __init__(self, module, table):
        self.module, self.table = module, table

    def names(self):
        return list(getattr(importlib.import_module(f"captioning.{self.module}"), self.table))

    def __iter__(self):
        return iter(self.names())

    def __contains__(self, name):
        return name in self.names()


ARCHITECTURES = TableNames("architectures", "ARCHITECTURES")
DATASETS = TableNames("data", "DATASETS")
ENCODERS = TableNames("encoders", "ENCODERS")
PRESETS = TableNames("training", "PRESETS")
FORMATS = TableNames("export", "FORMATS")


def bounded(low, high=None):
    """An argparse type: an integer in [low, high], else a usage error (exit 2) before any work."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range: use {low} to {high}" if high is not None
                                             else f"{value} is out of range: use {low} or more")
        return value
    return parse


def shard(text):
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} does not look like I/N (e.g. 0/4)") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"{text!r}: I must be 0 to N-1")
    return index, count


def _add_dataset_arguments(parser):
    parser.add_argument("--dataset", choices=DATASETS, metavar="NAME", default="coco",
                        help="%(choices)s (default %(default)s)")
    parser.add_argument("--data-dir", required=True, help="folder holding the dataset's annotations and images")


def _add_encoder_arguments(parser):
    parser.add_argument("--encoder", choices=ENCODERS, metavar="NAME", default="inception_v3",
                        help="%(choices)s (default %(default)s)")
    parser.add_argument(
        "--weights", default="imagenet",
        help="'imagenet' (Keras downloads them) or the path of a local .weights.h5 file",
    )


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m captioning", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also CAPTIONING_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare", help="load annotations, clean captions, build the vocabulary")
    _add_dataset_arguments(prepare)
    prepare.add_argument("--out", required=True, help="folder for the prepared tables and vocabulary")
    prepare.add_argument("--min-count", type=bounded(1), default=5, help="drop words seen fewer times")
    prepare.add_argument("--max-vocab", type=bounded(5), default=None, help="keep at most this many words")
    prepare.add_argument("--max-length", type=bounded(1, 200), default=20, help="longest caption in words")
    prepare.add_argument("--karpathy-split", default=None, help="COCO only: path of Karpathy's dataset_coco.json")
    prepare.set_defaults(handler=cmd_prepare)

    features = commands.add_parser("features", help="cache CNN features of every image found on disk")
    _add_dataset_arguments(features)
    _add_encoder_arguments(features)
    features.add_argument("--out", required=True, help="feature cache folder")
    features.add_argument("--batch-size", type=bounded(1, 1024), default=32)
    features.add_argument("--pooling", choices=("avg", "none"), default="avg",
                          help="'avg': one vector per image; 'none': the spatial grid (for attention)")
    features.add_argument("--no-mirror", dest="mirror", action="store_false",
                          help="encode each photo once, not averaged with its mirror image (half the time; "
                               "the default recipe averages, docs/experiments.md)")
    features.add_argument("--shard", type=shard, default=None, metavar="I/N",
                          help="cache only shard I of N (0-based), to spread the work over machines")
    features.add_argument("--rehash", action="store_true",
                          help="read every photo to check its content, not only those whose size or times changed "
                               "(for file systems that keep no change time, e.g. Windows or FAT drives)")
    features.set_defaults(handler=cmd_features)

    merge = commands.add_parser("merge-shards", help="combine the folders of `features --shard I/N` into one cache")
    merge.add_argument("shards", nargs="+", metavar="SHARD_DIR", help="the N shard folders, in any order")
    merge.add_argument("--out", required=True, help="feature cache folder to write")
    merge.set_defaults(handler=cmd_merge_shards)

    train = commands.add_parser("train", help="prepare, cache features and train a captioner")
    _add_dataset_arguments(train)
    _add_encoder_arguments(train)
    train.add_argument("--arch", choices=ARCHITECTURES, metavar="NAME", default="merge",
                       help="%(choices)s (default %(default)s); those that read grids (attention) cache the "
                            "CNN's spatial grid")
    train.add_argument("--out", required=True, help="bundle folder to write")
    train.add_argument("--overwrite", action="store_true",
                       help="replace a trained bundle in --out (only once the new one is complete)")
    train.add_argument("--epochs", type=bounded(1, 10_000), default=None, help="default: the preset's")
    train.add_argument("--preset", choices=PRESETS, metavar="NAME", default="cpu-small",
                       help="%(choices)s (default %(default)s)")
    train.add_argument("--self-critical-epochs", type=bounded(0, 10_000), default=None,
                       help="CIDEr-D fine-tuning after teacher forcing (default: the preset's; 0 = none)")
    train.add_argument("--cache-dir", default=None,
                       help="where prepared data and features are cached (default: data/work)")
    train.add_argument("--karpathy-split", default=None, help="COCO only: path of Karpathy's dataset_coco.json")
    train.add_argument("--seed", type=bounded(0), default=0)
    train.add_argument("--distribute", choices=("none", "mirrored", "multi-worker"), default="none",
                       help="tf.distribute strategy: all local GPUs, or several machines (TF_CONFIG)")
    train.add_argument("--peer-timeout", type=bounded(1), default=cluster.DEFAULT_TIMEOUT, metavar="SECONDS",
                       help="multi-worker: how long to wait for the other workers to answer (default %(default)s)")
    train.set_defaults(handler=cmd_train)

    caption = commands.add_parser("caption", help="caption image files with a trained bundle")
    caption.add_argument("--model", required=True, help="bundle folder written by `train`")
    caption.add_argument("--beam", type=bounded(1, 100), default=3, help="beam width (1 = greedy)")
    caption.add_argument("--batch-size", type=bounded(1, 1024), default=32)
    caption.add_argument("--format", choices=("tsv", "jsonl"), default="tsv",
                         help="tsv: PATH<TAB>CAPTION per line (tabs, newlines and backslashes in PATH written as "
                              "\\t, \\n, \\\\); jsonl: one JSON object per photo, errors included")
    caption.add_argument("--weights", default=None,
                         help="where to find the encoder weights the bundle was trained with, if not where "
                              "bundle.json says (they must be the same weights)")
    caption.add_argument("images", nargs="+", metavar="IMAGE")
    caption.set_defaults(handler=cmd_caption)

    evaluate = commands.add_parser("evaluate", help="score a bundle's captions on a held-out split")
    evaluate.add_argument("--model", required=True, help="bundle folder written by `train`")
    _add_dataset_arguments(evaluate)
    evaluate.add_argument("--split", required=True, help="e.g. val (COCO), dev or test (Flickr8k)")
    evaluate.add_argument("--beam", type=bounded(1, 100), default=3)
    evaluate.add_argument("--out", default=None,
                          help="folder for metrics.json and captions.json (default: BUNDLE/eval-SPLIT)")
    evaluate.add_argument("--cache-dir", default=None, help="feature cache location (default: data/work)")
    evaluate.add_argument("--karpathy-split", default=None,
                          help="COCO only: Karpathy's dataset_coco.json, for --split test/val/restval")
    evaluate.set_defaults(handler=cmd_evaluate)

    export = commands.add_parser("export", help="write a bundle as a TensorFlow SavedModel or a LiteRT model, "
                                                "to caption photos without this package")
    export.add_argument("--model", required=True, help="bundle folder written by `train`")
    export.add_argument("--out", required=True, help="folder to write (an existing one must be empty or a previous "
                                                     "export, which is replaced)")
    export.add_argument("--format", choices=FORMATS, metavar="FORMAT", default="savedmodel",
                        help="'savedmodel': photo bytes in, captions out; 'litert': a .tflite file, resized pixels "
                             "in, word ids out (see captioning/export.py)")
    export.add_argument("--beam", type=bounded(1, 100), default=3, help="beam width built into the export (1 = greedy)")
    export.add_argument("--weights", default=None,
                        help="where to find the encoder weights the bundle was trained with, if not where "
                             "bundle.json says (they must be the same weights)")
    export.set_defaults(handler=cmd_export)
    return parser


# --- command bodies -------------------------------------------------------------
# Each returns an exit status.

def cmd_prepare(args):
    from captioning import data
    from captioning.fileio import left_out_rows, writable_folder

    writable_folder(args.out, "--out folder")
    prepared = data.prepare(
        args.dataset, args.data_dir, args.out, min_count=args.min_count, max_vocab=args.max_vocab,
        max_length=args.max_length, karpathy_split=args.karpathy_split,
    )
    report = prepared.report
    print(f"{args.dataset} in {args.data_dir}:")
    print(f"  annotations: {report.get('annotated_images', report['images']):,} images, "
          f"{report.get('annotated_captions', report['captions']):,} captions")
    print(f"  images found on disk: {report['images_on_disk']:,} "
          f"({report.get('dropped_images', 0):,} listed but missing were dropped)")
    print(f"  kept: {report['images']:,} images, {report['rows']:,} captions "
          f"(per split: {report['images_per_split']})")
    per_image, lengths = report["captions_per_image"], report["length_words"]
    print(f"  captions per image: {per_image['min']}-{per_image['max']} (mean {per_image['mean']}); "
          f"length {lengths['min']}-{lengths['max']} words (mean {lengths['mean']})")
    print(f"  empty: {report['empty_captions']}, duplicate: {report['duplicate_captions']}, "
          f"non-ASCII: {report['non_ascii_captions']}")
    for line in left_out_rows(report):  # a captions file of your own (own_data.py)
        print(f"  {line}")
    vocab = report["vocabulary"]
    print(f"  vocabulary: {vocab['size']:,} words (min count {vocab['min_count']}, max length "
          f"{vocab['max_length']}), unknown-word rate {vocab['unknown_word_rate']:.1%}")
    print(f"wrote {prepared.out_dir}/captions.csv, vocabulary.json, report.json")
    return 0


def cmd_features(args):
    from captioning.data import load_dataset
    from captioning.features import cache_features
    from captioning.fileio import writable_folder

    writable_folder(args.out, "--out folder")
    images = load_dataset(args.dataset, args.data_dir, on_disk_only=True)
    dropped = images.attrs.get("dropped_images", 0)
    if dropped:
        print(f"note: {dropped} images of the annotations are not on disk; "
              f"caching the {images['image_id'].nunique()} that are")
    report = cache_features(images, args.out, encoder=args.encoder, weights=args.weights,
                            pooling=None if args.pooling == "none" else "avg", mirror=args.mirror,
                            batch_size=args.batch_size, shard=args.shard, rehash=args.rehash)
    print(report.summary())
    if args.shard is not None:
        print(f"shard {args.shard[0]}/{args.shard[1]} done; when all are, combine them with "
              "`python -m captioning merge-shards SHARD_DIR ... --out OUT`")
    return 0


def cmd_merge_shards(args):
    from captioning.features import merge_shards
    from captioning.fileio import writable_folder

    writable_folder(args.out, "--out folder")
    print(merge_shards(args.shards, args.out).summary())
    return 0


def cmd_train(args):
    from captioning.pipeline import train_pipeline

    strategy = None
    if args.distribute == "mirrored":  # every GPU of this machine
        from captioning import quiet_tensorflow
        strategy = quiet_tensorflow().distribute.MirroredStrategy()
    elif args.distribute == "multi-worker":  # several machines, each told its role by TF_CONFIG
        from captioning import multi_worker_strategy
        strategy = multi_worker_strategy()
    bundle = train_pipeline(
        args.dataset, args.data_dir, encoder=args.encoder, weights=args.weights, arch=args.arch,
        out_dir=args.out, epochs=args.epochs, preset=args.preset, cache_dir=args.cache_dir,
        karpathy_split=args.karpathy_split, seed=args.seed, strategy=strategy, overwrite=args.overwrite,
        self_critical_epochs=args.self_critical_epochs,
    )
    print(f"bundle: {bundle}")
    return 0


def _tsv_field(text):
    """A file name on one TSV field: whatever bytes it holds, the line stays parseable."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def cmd_caption(args):
    import json

    from captioning.bundle import Captioner

    captioner = Captioner.load(args.model)
    captions, errors = captioner.caption_images(args.images, beam_width=args.beam, batch_size=args.batch_size,
                                                weights=args.weights)
    reasons = dict(errors)
    # One line per photo, in the order given; a bad file does not cost the others
    # their captions, but it does fail the command.
    for path, caption in zip(args.images, captions):
        if args.format == "jsonl":
            name = path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            row = {"path": name, "caption": caption} if caption is not None else {"path": name, "error": reasons[path]}
            print(json.dumps(row, ensure_ascii=False))
        elif caption is not None:
            print(f"{_tsv_field(path)}\t{caption}")
    for path, reason in errors:
        print(f"error: {_tsv_field(path)}: {reason}", file=sys.stderr)
    return 1 if errors else 0


def cmd_evaluate(args):
    import contextlib
    import json

    from captioning.evaluate import evaluate_bundle

    # stdout carries only the metrics JSON, so that `... | jq .coco.CIDEr` works:
    # anything the pipeline prints on the way goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        metrics = evaluate_bundle(args.model, args.dataset, args.data_dir, args.split, beam_width=args.beam,
                                  out_dir=args.out, cache_dir=args.cache_dir, karpathy_split=args.karpathy_split)
    print(json.dumps(metrics, indent=2))
    shown = metrics["diversity"]
    print(f"{shown['distinct_captions']} different captions for {metrics['images']} images, written to "
          f"{metrics['out_dir']}/captions.json", file=sys.stderr)
    return 0


def cmd_export(args):
    from captioning.export import export_bundle

    out = export_bundle(args.model, args.out, format=args.format, beam_width=args.beam, weights=args.weights)
    what = "model.tflite + vocabulary.json" if args.format == "litert" else "a SavedModel"
    print(f"exported {args.model} as {what} (beam width {args.beam}) to {out}")
    return 0


# What a command has kept when it is interrupted; running it again resumes or starts cleanly.
KEPT = {
    "prepare": "nothing half-written (each file is complete or absent)",
    "features": "the finished chunks of the feature cache",
    "merge-shards": "the shard folders, untouched",
    "train": "the teacher-forcing epochs finished so far, in OUT.partial/training",
    "caption": "nothing (caption writes no files)",
    "evaluate": "the feature cache; metrics.json and captions.json are written only when complete",
    "export": "nothing half-written",
}


def describe(error):
    """One line for a fault: what went wrong, with which file, and what to do."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        where = f" while writing {error.filename}" if error.filename else ""
        return f"no space left on the disk{where}: free some space and run the same command again; " \
               "finished work is kept"
    if isinstance(error, OSError) and error.filename is not None:
        hint = {errno.EACCES: "choose a file or folder you may use", errno.EROFS: "choose a writable folder",
                errno.ENOENT: "check the path", errno.EISDIR: "give a file, not a folder",
                errno.ENOTDIR: "a part of the path is a file, not a folder"}.get(error.errno, "check the path")
        return f"{error.filename}: {error.strerror or error}: {hint}"
    if isinstance(error, (ValueError, OSError, KeyError)):
        return str(error) if not isinstance(error, KeyError) else f"missing {error}"
    return f"unexpected {type(error).__name__}: {error} (run again with --debug to see where)"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(argument) for argument in argv]
    if "multi-worker" in argv and "--distribute" in argv:
        from captioning import tf_config_problem
        problem = tf_config_problem(os.environ.get("TF_CONFIG"))
        if problem:
            print(f"error: the TF_CONFIG environment variable {problem} (README: More than one machine)",
                  file=sys.stderr)
            return 1
                # Only --peer-timeout is read before the wait: the full parser's checks import TensorFlow,
        # which must not start before the strategy is made. A bad value exits 2 with the usage line.
        early = argparse.ArgumentParser(prog="python -m captioning train", add_help=False)
        early.add_argument("--peer-timeout", type=bounded(1), default=cluster.DEFAULT_TIMEOUT)
        status = cluster.wait_from_command_line(early.parse_known_args(argv)[0].peer_timeout)
        if status:
            return status
        # Before anything imports TensorFlow (checking --arch does): see quiet_tensorflow.
        from captioning import quiet_tensorflow
        quiet_tensorflow(multi_worker=True)
    args = build_parser().parse_args(argv)  # a bad option exits 2 with the usage line
    debug = args.debug or os.environ.get("CAPTIONING_DEBUG") == "1"
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"interrupted: kept {KEPT.get(args.command, 'what was finished')}; run the same command again "
              "to resume", file=sys.stderr)
        return 130
    except Exception as error:  # the boundary: every fault becomes one line
        if debug:
            raise
        message = " ".join(describe(error).split())  # one line, whatever the library wrote
        print(f"error: {message if len(message) < 600 else message[:600] + ' ...'}", file=sys.stderr)
        return 1
