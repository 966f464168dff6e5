"""The shared measurement record: CSV round trip and summaries."""

import numpy as np
import pytest

from hwmodel import Measurement, Provenance
from hwmodel.measure import from_csv, to_csv


def test_csv_round_trip():
    recs = [Measurement("resnet8", "layer1.0.conv1", "conv2d", "forward", 0.1, 0.1, 16, 2,
                        1.5e-3, 1e-4, 20, device="rpi4", temperature_c=51.0),
            Measurement("resnet8", "step", "step", "forward", 1.0, 1.0, 16, 2, 0.02, 0.001, 5)]
    assert from_csv(to_csv(recs)) == recs


def test_summarise_is_median_and_iqr():
    med, iqr = Measurement.summarise([1, 2, 3, 4, 100])
    assert med == 3 and iqr == pytest.approx(np.percentile([1, 2, 3, 4, 100], 75) - 2)


def test_unknown_or_missing_fields():
    with pytest.raises(ValueError, match="unknown field"):
        Measurement.from_dict({"colour": 1})
    with pytest.raises(ValueError, match="missing field 'model'"):
        Measurement.from_dict({})


def test_provenance_values_and_errors():
    assert [p.value for p in Provenance] == [
        "measured", "measured-emulated", "calibrated-estimate", "estimated"]
    assert str(Provenance.MEASURED_EMULATED) == "measured-emulated"
    with pytest.raises(ValueError, match="expected one of measured"):
        Provenance.parse("guessed")
