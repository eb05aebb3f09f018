"""``turnwise sagemaker submit|status|wait|logs|metrics|download|stop``: the shell side of `pipeline.sagemaker`.

Kept beside `pipeline.cli` (which lists `add_sagemaker_parser` in its ``COMMANDS``) because the command has
many options; like the rest of the CLI it is the only place here that prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_sagemaker_parser(subparsers) -> None:
    """``turnwise sagemaker ...``: submit training jobs and follow them (boto3; default credential chain)."""
    from pipeline.sagemaker import DEFAULT_DLC_VERSION, DLC_TAGS

    parser = subparsers.add_parser(
        "sagemaker",
        help="submit SageMaker training jobs and follow them",
        description="Submit a training recipe as a SageMaker training job on the Hugging Face PyTorch DLC, then "
        "follow it by name. Credentials come from the usual AWS chain (env, profile, role) and are never printed.",
        epilog="examples:\n"
        "  turnwise sagemaker submit --config configs/sagemaker/grpo_g5.yaml --role arn:aws:iam::123456789012:role/SM "
        "--bucket my-bucket --dry-run\n"
        "  turnwise sagemaker submit --config configs/sagemaker/grpo_g5.yaml --role ARN --bucket B --spot --train "
        "data/my_tasks --wait\n"
        "  turnwise sagemaker logs JOB --follow\n"
        "  turnwise sagemaker download JOB --out runs/sagemaker",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="sagemaker_action", required=True, metavar="ACTION")

    submit = actions.add_parser("submit", help="package the source, upload inputs and start a training job")
    submit.add_argument("--config", required=True, help="training recipe (YAML)")
    submit.add_argument("--role", required=True, help="SageMaker execution role ARN")
    submit.add_argument("--bucket", required=True, help="S3 bucket for source, inputs, checkpoints and outputs")
    submit.add_argument("--prefix", default="turnwise", help="key prefix under the bucket (default: turnwise)")
    submit.add_argument("--job-name", default=None, help="job name (default: turnwise-<recipe>-<UTC time>)")
    submit.add_argument("--region", default=None, help="AWS region (default: the session's)")
    submit.add_argument("--instance-type", default="ml.g5.2xlarge", help="training instance type (default ml.g5.2xlarge)")
    submit.add_argument("--instance-count", type=int, default=1, help="instances; >1 runs torch_distributed")
    submit.add_argument("--volume-size", type=int, default=100, help="EBS volume per instance, GB (default 100)")
    submit.add_argument("--max-runtime", type=int, default=24 * 3600, help="maximum runtime, seconds (default 86400)")
    submit.add_argument("--spot", action="store_true", help="managed spot training (resumes from checkpoints)")
    submit.add_argument("--max-wait", type=int, default=None, help="with --spot: max wait + runtime, seconds")
    submit.add_argument("--checkpoint-s3-uri", default=None, help="S3 URI for /opt/ml/checkpoints")
    submit.add_argument("--output-path", default=None, help="S3 URI for model.tar.gz")
    submit.add_argument("--image-uri", default=None,
                        help="container image (default: the HF PyTorch training DLC); warns when its tag names a torch "
                        "or Python the pinned stack does not run on")
    submit.add_argument("--dlc-version", default=DEFAULT_DLC_VERSION, choices=sorted(DLC_TAGS),
                        help="HF PyTorch training DLC by transformers version: "
                        + "; ".join(f"{v}: {t}" for v, t in DLC_TAGS.items()) + f" (default {DEFAULT_DLC_VERSION})")
    for channel in ("train", "val", "model"):
        submit.add_argument(f"--{channel}", default=None, metavar="PATH|S3_URI",
                            help=f"'{channel}' input channel: a local path (uploaded) or an s3:// URI")
    submit.add_argument("--hyperparameter", "-H", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value or an entry-point option (repeatable)")
    submit.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="job tag (repeatable)")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable of the job's container (repeatable); settings only, never secrets")
    submit.add_argument("--secret", action="append", default=[], metavar="NAME=SECRET_ID",
                        help="set environment variable NAME in the container from a Secrets Manager secret (name or "
                        "ARN, optionally #JSON_KEY), read at start-up; the value never enters the request (repeatable)")
    submit.add_argument("--mlflow-arn", default=None, metavar="ARN",
                        help="SageMaker-managed MLflow tracking server or app to log to (the job's MlflowConfig)")
    submit.add_argument("--mlflow-experiment", default=None, help="MLflow experiment name (with --mlflow-arn)")
    submit.add_argument("--mlflow-run", default=None, help="MLflow run name (with --mlflow-arn; default: the job name)")
    submit.add_argument("--subnet", action="append", default=[], help="VPC subnet id (repeatable)")
    submit.add_argument("--security-group", action="append", default=[], help="VPC security group id (repeatable)")
    submit.add_argument("--kms-key", default=None, help="KMS key for the output and the volumes")
    submit.add_argument("--network-isolation", action="store_true", help="no network access from the container")
    submit.add_argument("--dry-run", action="store_true", help="print the CreateTrainingJob request; send nothing")
    submit.add_argument("--wait", action="store_true", help="wait for the job to end, printing status changes")
    submit.set_defaults(func=run_submit)

    for name, helptext in (("status", "print a job's status"), ("wait", "wait for a job to end"),
                           ("logs", "print a job's CloudWatch logs"), ("metrics", "print a job's charted metrics"),
                           ("download", "download and extract a job's model.tar.gz"), ("stop", "stop a job")):
        action = actions.add_parser(name, help=helptext)
        action.add_argument("job", help="training job name")
        action.add_argument("--region", default=None, help="AWS region (default: the session's)")
        if name == "logs":
            action.add_argument("--follow", action="store_true", help="keep reading until the job ends")
        if name == "wait":
            action.add_argument("--poll", type=float, default=30.0, help="seconds between polls (default 30)")
        if name == "download":
            action.add_argument("--out", type=Path, default=Path("."), help="extract into OUT/JOB (default: .)")
        action.set_defaults(func=run_job_action)


def run_submit(args: argparse.Namespace) -> int:
    from pipeline.sagemaker import SubmitConfig, split_pairs, submit

    inputs = {name: getattr(args, name) for name in ("train", "val", "model") if getattr(args, name)}
    config = SubmitConfig(
        config=args.config, role=args.role, bucket=args.bucket, prefix=args.prefix, job_name=args.job_name,
        region=args.region, instance_type=args.instance_type, instance_count=args.instance_count,
        volume_size_gb=args.volume_size, max_runtime_s=args.max_runtime, spot=args.spot, max_wait_s=args.max_wait,
        checkpoint_s3_uri=args.checkpoint_s3_uri, output_path=args.output_path, image_uri=args.image_uri,
        dlc_version=args.dlc_version, inputs=inputs, hyperparameters=split_pairs(args.hyperparameter, "--hyperparameter"),
        tags=split_pairs(args.tag, "--tag"), environment=split_pairs(args.env, "--env"),
        secrets=split_pairs(args.secret, "--secret"), mlflow_arn=args.mlflow_arn,
        mlflow_experiment=args.mlflow_experiment, mlflow_run=args.mlflow_run, subnets=args.subnet,
        security_group_ids=args.security_group, kms_key=args.kms_key, network_isolation=args.network_isolation,
    )
    result = submit(config, dry_run=args.dry_run)
    if args.dry_run:
        print(json.dumps(result, indent=2))
        print("(dry run: nothing was uploaded or sent)", file=sys.stderr)
        return 0
    print(f"submitted {result.name}")
    if args.wait:
        return _wait(result, poll=30.0)
    return 0


def _wait(job, poll: float) -> int:
    from pipeline.sagemaker import TrainingJobFailed

    def progress(d):
        message = (d.get("SecondaryStatusTransitions") or [{}])[-1].get("StatusMessage", "")
        print(f"{d['TrainingJobStatus']:>10} / {d.get('SecondaryStatus', '')}: {message}", flush=True)

    try:
        description = job.wait(poll_s=poll, on_progress=progress)
    except TrainingJobFailed as error:
        print(f"turnwise: error: {error}", file=sys.stderr)
        return 1
    print(f"model artifacts: {description.get('ModelArtifacts', {}).get('S3ModelArtifacts', '-')}")
    return 0


def run_job_action(args: argparse.Namespace) -> int:
    from pipeline.sagemaker import TrainingJob

    job = TrainingJob(args.job, region=args.region)
    if args.sagemaker_action == "status":
        d = job.describe()
        print(f"{job.name}: {d['TrainingJobStatus']} ({d.get('SecondaryStatus', '')})")
        if d.get("FailureReason"):
            print(f"  reason: {d['FailureReason']}")
    elif args.sagemaker_action == "wait":
        return _wait(job, poll=args.poll)
    elif args.sagemaker_action == "logs":
        for line in job.logs(follow=args.follow):
            print(line, flush=True)
    elif args.sagemaker_action == "metrics":
        for name, values in job.metrics().items():
            print(f"{name:>28}: last {values[-1]:.4g}  ({len(values)} points)")
    elif args.sagemaker_action == "download":
        print(f"extracted to {job.download(args.out)}")
    elif args.sagemaker_action == "stop":
        job.stop()
        print(f"stopping {job.name}")
    return 0
