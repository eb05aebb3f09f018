"""``turnwise sagemaker submit|status|wait|logs|metrics|download|stop``: the shell side of `pipeline.sagemaker`.

Options: :class:`SubmitArguments` (turned into `pipeline.sagemaker.SubmitConfig`, whose checks run before
anything is uploaded), :class:`JobArguments` and the small dataclasses of the job actions.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.sagemaker import DEFAULT_DLC_VERSION, DLC_TAGS  # no boto3: cheap

DESCRIPTION = ("Submit a training recipe as a SageMaker training job on the Hugging Face PyTorch DLC, then follow it by "
               "name. Credentials come from the usual AWS chain (env, profile, role) and are never printed.")
EPILOG = """examples:
  turnwise sagemaker submit --config configs/sagemaker/grpo_g5.yaml --role arn:aws:iam::123456789012:role/SM --bucket my-bucket --dry-run
  turnwise sagemaker submit --config configs/sagemaker/grpo_g5.yaml --role ARN --bucket B --spot --train data/my_tasks --wait
  turnwise sagemaker logs JOB --follow
  turnwise sagemaker download JOB --out runs/sagemaker"""
ACTIONS = {"submit": "package the source, upload inputs and start a training job", "status": "print a job's status",
           "wait": "wait for a job to end", "logs": "print a job's CloudWatch logs",
           "metrics": "print a job's charted metrics", "download": "download and extract a job's model.tar.gz",
           "stop": "stop a job"}


def _pairs(help_text: str, metavar: str = "KEY=VALUE") -> dict:
    return {"help": f"{help_text} (repeatable)", "action": "extend", "metavar": metavar}


@dataclass
class SubmitArguments:
    """One training job, as flags (see `pipeline.sagemaker.SubmitConfig` for what each becomes)."""

    recipe: str = field(metadata={"help": "Training recipe (YAML).", "aliases": ["--config"]})
    role: str = field(metadata={"help": "SageMaker execution role ARN."})
    bucket: str = field(metadata={"help": "S3 bucket for source, inputs, checkpoints and outputs."})
    prefix: str = field(default="turnwise", metadata={"help": "Key prefix under the bucket."})
    job_name: str | None = field(default=None, metadata={"help": "Job name (default: turnwise-<recipe>-<UTC time>)."})
    region: str | None = field(default=None, metadata={"help": "AWS region (default: the session's)."})
    instance_type: str = field(default="ml.g5.2xlarge", metadata={"help": "Training instance type."})
    instance_count: int = field(default=1, metadata={"help": "Instances; more than 1 runs torch_distributed."})
    volume_size: int = field(default=100, metadata={"help": "EBS volume per instance, GB."})
    max_runtime: int = field(default=24 * 3600, metadata={"help": "Maximum runtime, seconds."})
    spot: bool = field(default=False, metadata={"help": "Managed spot training (resumes from checkpoints)."})
    max_wait: int | None = field(default=None, metadata={"help": "With --spot: max wait + runtime, seconds."})
    checkpoint_s3_uri: str | None = field(default=None, metadata={"help": "S3 URI for /opt/ml/checkpoints."})
    output_path: str | None = field(default=None, metadata={"help": "S3 URI for model.tar.gz."})
    image_uri: str | None = field(default=None, metadata={
        "help": "Container image (default: the HF PyTorch training DLC); warns when its tag names a torch or Python "
                "the pinned stack does not run on."})
    dlc_version: str = field(default=DEFAULT_DLC_VERSION, metadata={
        "help": "HF PyTorch training DLC by transformers version: " + "; ".join(f"{v}: {t}" for v, t in DLC_TAGS.items())
                + "."})
    train: str | None = field(default=None, metadata={
        "help": "'train' input channel: a local path (uploaded) or an s3:// URI.", "metavar": "PATH|S3_URI"})
    val: str | None = field(default=None, metadata={
        "help": "'val' input channel: a local path (uploaded) or an s3:// URI.", "metavar": "PATH|S3_URI"})
    model: str | None = field(default=None, metadata={
        "help": "'model' input channel: a local path (uploaded) or an s3:// URI.", "metavar": "PATH|S3_URI"})
    hyperparameter: list[str] = field(default_factory=list, metadata={
        **_pairs("Override a recipe value or an entry-point option"), "aliases": ["-H"]})
    tag: list[str] = field(default_factory=list, metadata=_pairs("Job tag"))
    env: list[str] = field(default_factory=list, metadata=_pairs(
        "Environment variable of the job's container; settings only, never secrets"))
    secret: list[str] = field(default_factory=list, metadata=_pairs(
        "Set environment variable NAME in the container from a Secrets Manager secret (name or ARN, optionally "
        "#JSON_KEY), read at start-up; the value never enters the request", "NAME=SECRET_ID"))
    mlflow_arn: str | None = field(default=None, metadata={
        "help": "SageMaker-managed MLflow tracking server or app to log to (the job's MlflowConfig).", "metavar": "ARN"})
    mlflow_experiment: str | None = field(default=None, metadata={"help": "MLflow experiment name (with --mlflow-arn)."})
    mlflow_run: str | None = field(default=None, metadata={
        "help": "MLflow run name (with --mlflow-arn; default: the job name)."})
    subnet: list[str] = field(default_factory=list, metadata={
        "help": "VPC subnet id (repeatable).", "action": "extend"})
    security_group: list[str] = field(default_factory=list, metadata={
        "help": "VPC security group id (repeatable).", "action": "extend"})
    kms_key: str | None = field(default=None, metadata={"help": "KMS key for the output and the volumes."})
    network_isolation: bool = field(default=False, metadata={"help": "No network access from the container."})
    dry_run: bool = field(default=False, metadata={"help": "Print the CreateTrainingJob request; send nothing."})
    wait: bool = field(default=False, metadata={"help": "Wait for the job to end, printing status changes."})

    def config(self):
        """The `pipeline.sagemaker.SubmitConfig` these flags describe (its checks run here)."""
        from pipeline.sagemaker import SubmitConfig, split_pairs

        if self.dlc_version not in DLC_TAGS:
            raise ValueError(f"--dlc-version {self.dlc_version!r} is not a DLC turnwise knows; use one of "
                             + "; ".join(f"{v} ({t})" for v, t in DLC_TAGS.items()) + ".")
        inputs = {name: getattr(self, name) for name in ("train", "val", "model") if getattr(self, name)}
        return SubmitConfig(
            config=self.recipe, role=self.role, bucket=self.bucket, prefix=self.prefix, job_name=self.job_name,
            region=self.region, instance_type=self.instance_type, instance_count=self.instance_count,
            volume_size_gb=self.volume_size, max_runtime_s=self.max_runtime, spot=self.spot, max_wait_s=self.max_wait,
            checkpoint_s3_uri=self.checkpoint_s3_uri, output_path=self.output_path, image_uri=self.image_uri,
            dlc_version=self.dlc_version, inputs=inputs,
            hyperparameters=split_pairs(self.hyperparameter, "--hyperparameter"), tags=split_pairs(self.tag, "--tag"),
            environment=split_pairs(self.env, "--env"), secrets=split_pairs(self.secret, "--secret"),
            mlflow_arn=self.mlflow_arn, mlflow_experiment=self.mlflow_experiment, mlflow_run=self.mlflow_run,
            subnets=self.subnet, security_group_ids=self.security_group, kms_key=self.kms_key,
            network_isolation=self.network_isolation)


@dataclass
class JobArguments:
    """The job an action follows: ``turnwise sagemaker ACTION JOB``."""

    region: str | None = field(default=None, metadata={"help": "AWS region (default: the session's)."})


@dataclass
class LogsArguments:
    follow: bool = field(default=False, metadata={"help": "Keep reading until the job ends."})


@dataclass
class WaitArguments:
    poll: float = field(default=30.0, metadata={"help": "Seconds between polls."})

    def __post_init__(self) -> None:
        if not self.poll > 0:
            raise ValueError(f"--poll must be a positive number of seconds, got {self.poll}.")


@dataclass
class DownloadArguments:
    out: Path = field(default=Path("."), metadata={"help": "Extract into OUT/JOB."})


EXTRA = {"logs": LogsArguments, "wait": WaitArguments, "download": DownloadArguments}
"""The job actions that take an option of their own."""


def register(subparsers) -> None:
    parser = subparsers.add_parser("sagemaker", help="submit SageMaker training jobs and follow them",
                                   description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_text in ACTIONS.items():
        actions.add_parser(name, add_help=False, help=help_text).set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.config import parse_options

    prog = f"turnwise sagemaker {args.action}"
    if args.action == "submit":
        [options] = parse_options((SubmitArguments,), args.options, prog=prog, description=DESCRIPTION,
                                  epilog=EPILOG, recipe_flag=False)
        return submit(options)
    types = (JobArguments, *((EXTRA[args.action],) if args.action in EXTRA else ()))
    *parsed, where = parse_options(types, args.options, prog=prog, description=ACTIONS[args.action][0].upper() + ACTIONS[args.action][1:] + ".",
                                   recipe_flag=False, positionals=[("job", {"help": "training job name"})])
    return job_action(args.action, where.job, *parsed)


def submit(options: SubmitArguments) -> int:
    from pipeline.sagemaker import submit as submit_job

    result = submit_job(options.config(), dry_run=options.dry_run)
    if options.dry_run:
        print(json.dumps(result, indent=2))
        print("(dry run: nothing was uploaded or sent)", file=sys.stderr)
        return 0
    print(f"submitted {result.name}")
    if options.wait:
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


def job_action(action: str, name: str, job_args: JobArguments, extra=None) -> int:
    from pipeline.sagemaker import TrainingJob

    job = TrainingJob(name, region=job_args.region)
    if action == "status":
        d = job.describe()
        print(f"{job.name}: {d['TrainingJobStatus']} ({d.get('SecondaryStatus', '')})")
        if d.get("FailureReason"):
            print(f"  reason: {d['FailureReason']}")
    elif action == "wait":
        return _wait(job, poll=extra.poll)
    elif action == "logs":
        for line in job.logs(follow=extra.follow):
            print(line, flush=True)
    elif action == "metrics":
        for metric, values in job.metrics().items():
            print(f"{metric:>28}: last {values[-1]:.4g}  ({len(values)} points)")
    elif action == "download":
        print(f"extracted to {job.download(extra.out)}")
    elif action == "stop":
        job.stop()
        print(f"stopping {job.name}")
    return 0
