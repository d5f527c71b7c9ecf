"""Ingest + crop the data sets once, with the stage functions."""
import os
import sys
from triview import stages, params

if __name__ == "__main__":
    name, data, *extra = sys.argv[1:]
    out = f"{os.environ.get('TRIVIEW_ENSEMBLE_BENCH', '/tmp/ensemble')}/{name}"
    kw = dict(p.split("=", 1) for p in extra)
    ing = params.validate({k: v for k, v in kw.items() if k in params.names("ingest")})
    crp = params.validate({k: v for k, v in kw.items() if k in params.names("calibrate-and-crop")})
    stages.ingest_stage(data, out + "/ingest", plot=False, **ing)
    stages.calibrate_and_crop_stage(out + "/ingest", out + "/views", **crp)
    print("done", name)
