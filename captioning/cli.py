"""`python -m captioning COMMAND ...`: the pipeline from the shell.

Each command is a thin wrapper: it parses arguments, calls the library
function that the matching notebook teaches, and prints a short summary.
Library errors (ValueError, FileNotFoundError) are printed as one clear line
and give exit status 2, rather than a traceback a learner has to decode.
The choices of --dataset, --encoder, --arch and --preset are the package's
tables (data.DATASETS, encoders.ENCODERS, architectures.ARCHITECTURES,
training.PRESETS): register a new one there and the command line offers it.
"""

import argparse
import sys

from captioning.architectures import ARCHITECTURES
from captioning.data import DATASETS
from captioning.encoders import ENCODERS
from captioning.export import FORMATS
from captioning.training import PRESETS


def _add_dataset_arguments(parser):
    parser.add_argument("--dataset", choices=list(DATASETS), default="coco")
    parser.add_argument("--data-dir", required=True, help="folder holding the dataset's annotations and images")


def _add_encoder_arguments(parser):
    parser.add_argument("--encoder", choices=list(ENCODERS), default="inception_v3")
    parser.add_argument(
        "--weights", default="imagenet",
        help="'imagenet' (Keras downloads them) or the path of a local .weights.h5 file",
    )


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m captioning", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare", help="load annotations, clean captions, build the vocabulary")
    _add_dataset_arguments(prepare)
    prepare.add_argument("--out", required=True, help="folder for the prepared tables and vocabulary")
    prepare.add_argument("--min-count", type=int, default=5, help="drop words seen fewer times")
    prepare.add_argument("--max-vocab", type=int, default=None, help="keep at most this many words")
    prepare.add_argument("--max-length", type=int, default=20, help="longest caption in words")
    prepare.add_argument("--karpathy-split", default=None, help="COCO only: path of Karpathy's dataset_coco.json")
    prepare.set_defaults(handler=cmd_prepare)

    features = commands.add_parser("features", help="cache CNN features of every image found on disk")
    _add_dataset_arguments(features)
    _add_encoder_arguments(features)
    features.add_argument("--out", required=True, help="feature cache folder")
    features.add_argument("--batch-size", type=int, default=32)
    features.add_argument("--pooling", choices=("avg", "none"), default="avg",
                          help="'avg': one vector per image; 'none': the spatial grid (for attention)")
    features.add_argument("--no-mirror", dest="mirror", action="store_false",
                          help="encode each photo once, not averaged with its mirror image (half the time)")
    features.add_argument("--shard", default=None, metavar="I/N",
                          help="cache only shard I of N (0-based), to spread the work over machines")
    features.set_defaults(handler=cmd_features)

    train = commands.add_parser("train", help="prepare, cache features and train a captioner")
    _add_dataset_arguments(train)
    _add_encoder_arguments(train)
    train.add_argument("--arch", choices=list(ARCHITECTURES), default="merge",
                       help="architectures that read grids (attention) cache the CNN's spatial grid")
    train.add_argument("--out", required=True, help="bundle folder to write")
    train.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    train.add_argument("--preset", choices=list(PRESETS), default="cpu-small")
    train.add_argument("--self-critical-epochs", type=int, default=None,
                       help="CIDEr-D fine-tuning after teacher forcing (default: the preset's; 0 = none)")
    train.add_argument("--cache-dir", default=None,
                       help="where prepared data and features are cached (default: data/work)")
    train.add_argument("--karpathy-split", default=None, help="COCO only: path of Karpathy's dataset_coco.json")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--distribute", choices=("none", "mirrored", "multi-worker"), default="none",
                       help="tf.distribute strategy: all local GPUs, or several machines (TF_CONFIG)")
    train.set_defaults(handler=cmd_train)

    caption = commands.add_parser("caption", help="caption image files with a trained bundle")
    caption.add_argument("--model", required=True, help="bundle folder written by `train`")
    caption.add_argument("--beam", type=int, default=3, help="beam width (1 = greedy)")
    caption.add_argument("--batch-size", type=int, default=32)
    caption.add_argument("--weights", default=None,
                         help="where to find the encoder weights the bundle was trained with, if not where "
                              "bundle.json says (they must be the same weights)")
    caption.add_argument("images", nargs="+", metavar="IMAGE")
    caption.set_defaults(handler=cmd_caption)

    evaluate = commands.add_parser("evaluate", help="score a bundle's captions on a held-out split")
    evaluate.add_argument("--model", required=True, help="bundle folder written by `train`")
    _add_dataset_arguments(evaluate)
    evaluate.add_argument("--split", required=True, help="e.g. val (COCO), dev or test (Flickr8k)")
    evaluate.add_argument("--beam", type=int, default=3)
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
    export.add_argument("--format", choices=FORMATS, default="savedmodel",
                        help="'savedmodel': photo bytes in, captions out; 'litert': a .tflite file, resized pixels "
                             "in, word ids out (see captioning/export.py)")
    export.add_argument("--beam", type=int, default=3, help="beam width built into the export (1 = greedy)")
    export.add_argument("--weights", default=None,
                        help="where to find the encoder weights the bundle was trained with, if not where "
                             "bundle.json says (they must be the same weights)")
    export.set_defaults(handler=cmd_export)
    return parser


# --- command bodies -------------------------------------------------------------
# Each returns an exit status.

def cmd_prepare(args):
    from captioning import data
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
          f"non-ASCII: {report['non_ascii_captions']}, orphan captions: {report.get('orphan_captions', 0)}")
    vocab = report["vocabulary"]
    print(f"  vocabulary: {vocab['size']:,} words (min count {vocab['min_count']}, max length "
          f"{vocab['max_length']}), unknown-word rate {vocab['unknown_word_rate']:.1%}")
    print(f"wrote {prepared.out_dir}/captions.csv, vocabulary.json, report.json")
    return 0


def cmd_features(args):
    from captioning.data import load_dataset
    from captioning.features import cache_features

    shard = None
    if args.shard:
        try:
            shard = tuple(int(part) for part in args.shard.split("/"))
        except ValueError:
            shard = ()
        if len(shard) != 2:
            raise ValueError(f"--shard must look like I/N (e.g. 0/4), not {args.shard!r}")
    images = load_dataset(args.dataset, args.data_dir, on_disk_only=True)
    dropped = images.attrs.get("dropped_images", 0)
    if dropped:
        print(f"note: {dropped} images of the annotations are not on disk; "
              f"caching the {images['image_id'].nunique()} that are")
    report = cache_features(images, args.out, encoder=args.encoder, weights=args.weights,
                            pooling=None if args.pooling == "none" else "avg", mirror=args.mirror,
                            batch_size=args.batch_size, shard=shard)
    print(report.summary())
    if shard is not None:
        print(f"shard {shard[0]}/{shard[1]} done; combine all shards with captioning.features.merge_shards")
    return 0


def cmd_train(args):
    if args.self_critical_epochs is not None and args.self_critical_epochs < 0:
        raise ValueError(f"--self-critical-epochs must be 0 or more, not {args.self_critical_epochs}")
    from captioning.pipeline import train_pipeline

    strategy = None
    if args.distribute != "none":
        from captioning import quiet_tensorflow
        tf = quiet_tensorflow()
        # mirrored: every GPU of this machine; multi-worker: several machines, each
        # told its role by the TF_CONFIG environment variable.
        strategy = (tf.distribute.MirroredStrategy() if args.distribute == "mirrored"
                    else tf.distribute.MultiWorkerMirroredStrategy())
    bundle = train_pipeline(
        args.dataset, args.data_dir, encoder=args.encoder, weights=args.weights, arch=args.arch,
        out_dir=args.out, epochs=args.epochs, preset=args.preset, cache_dir=args.cache_dir,
        karpathy_split=args.karpathy_split, seed=args.seed, strategy=strategy,
        self_critical_epochs=args.self_critical_epochs,
    )
    print(f"bundle: {bundle}")
    return 0


def cmd_caption(args):
    if args.beam < 1:
        raise ValueError(f"--beam must be at least 1 (1 = greedy), not {args.beam}")
    from captioning.bundle import Captioner

    captioner = Captioner.load(args.model)
    captions, errors = captioner.caption_images(args.images, beam_width=args.beam, batch_size=args.batch_size,
                                                weights=args.weights)
    # One line per image that could be read, in the order given; a bad file
    # does not cost the others their captions, but it does fail the command.
    for path, caption in zip(args.images, captions):
        if caption is not None:
            print(f"{path}\t{caption}")
    for path, reason in errors:
        print(f"error: {path}: {reason}", file=sys.stderr)
    return 1 if errors else 0


def cmd_evaluate(args):
    import contextlib
    import json

    from captioning.pipeline import evaluate_bundle

    # stdout carries only the metrics JSON, so that `... | jq .coco.CIDEr` works:
    # anything the pipeline prints on the way goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        metrics = evaluate_bundle(args.model, args.dataset, args.data_dir, args.split, beam_width=args.beam,
                                  out_dir=args.out, cache_dir=args.cache_dir, karpathy_split=args.karpathy_split)
    print(json.dumps(metrics, indent=2))
    print(f"captions of {metrics['images']} images written to {metrics['out_dir']}/captions.json", file=sys.stderr)
    return 0


def cmd_export(args):
    if args.beam < 1:
        raise ValueError(f"--beam must be at least 1 (1 = greedy), not {args.beam}")
    from captioning.export import export_bundle

    out = export_bundle(args.model, args.out, format=args.format, beam_width=args.beam, weights=args.weights)
    what = "model.tflite + vocabulary.json" if args.format == "litert" else "a SavedModel"
    print(f"exported {args.model} as {what} (beam width {args.beam}) to {out}")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
