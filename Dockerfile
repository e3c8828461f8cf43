# The task image of millstream's AWS Batch steps (set it as [batch] image or @batch(image=)).
#
# The container's command is `python -m millstream.compute.bootstrap` (the job definition
# sets it): it reads MILLSTREAM_DATASTORE, MILLSTREAM_CODE_PACKAGE and MILLSTREAM_SPEC_KEY
# from the job's environment, fetches and verifies the flow's code package from S3,
# unpacks it and runs the task runner. The flow's own code is never baked in, so one image
# serves every flow; add the libraries your steps import on top of it.
#
#   docker build -t millstream-task .
#   docker tag millstream-task <account>.dkr.ecr.<region>.amazonaws.com/millstream-task:<version>
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# An unprivileged user; the bootstrap unpacks code packages under its temporary directory.
RUN useradd --create-home --uid 1000 task
WORKDIR /opt/millstream
COPY pyproject.toml README.md ./
COPY millstream ./millstream
RUN pip install . && python -c "import millstream.compute.bootstrap"

USER task
WORKDIR /home/task
CMD ["python", "-m", "millstream.compute.bootstrap"]
