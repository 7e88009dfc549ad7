"""The one description of a run (:mod:`nnalign.runs`): specs <-> trainer names for every anchor, KD method and option,
names it did not make refused, and one-line errors for bad settings."""
from __future__ import annotations

import itertools
import re

import pytest

from nnalign.errors import NnalignError
from nnalign.losses.kd.registry import KD_METHODS
from nnalign.modalities import BRATS_MODALITIES, all_subsets
from nnalign.networks.anchor_registry import ALIGN_DISTANCES, ANCHOR_KINDS, ANCHORS
from nnalign.runs import (SUBSET_SAMPLINGS, TEACHER_ANCHORS, BaselineSpec, StudentSpec, TeacherSpec, TrainingLength,
                          overrides_hash, parse_trainer_name, teacher_spec)

P_STAR = TeacherSpec("mixture", modality_dropout=0.0)  # named nnAlignTeacher_mixture


# ----------------------------------------------------------------------------------------------------------------------
# teachers


@pytest.mark.parametrize("spec, name", [
    (TeacherSpec(), "nnAlignTeacher_mixture_drop0p5"),  # P* trains with modality dropout 0.5 by default
    (TeacherSpec("mixture", modality_dropout=0.0), "nnAlignTeacher_mixture"),  # what the name always meant
    (TeacherSpec("mixture-scaled"), "nnAlignTeacher_mixturescaled"),  # nnalign's scaled P*: no dropout by default
    (TeacherSpec("Mixture-Scaled", modality_dropout=0.5), "nnAlignTeacher_mixturescaled_drop0p5"),
    (TeacherSpec("modality", align_distance="relative"), "nnAlignTeacher_modalityT1ce_rel"),
    (TeacherSpec("mixture", modality_dropout=0.5, subset_sampling="balanced", align_distance="relative"),
     "nnAlignTeacher_mixture_drop0p5_bal_rel"),
    (TeacherSpec("modality", stop_gradient=False, align_distance="relative"), "nnAlignTeacher_modalityT1ce_nosg_rel"),
    (TeacherSpec("none"), "nnAlignTeacher_none"),
    (TeacherSpec("normal", 1e-5), "nnAlignTeacher_normal_w1em05"),
    (TeacherSpec("modality"), "nnAlignTeacher_modalityT1ce"),
    (TeacherSpec("modality:t2f", 0.5, False, 0.3, False), "nnAlignTeacher_modalityFLAIR_w0p5_sep_drop0p3_nosg"),
    (TeacherSpec("mixture", 2.0, True, 0.25), "nnAlignTeacher_mixture_w2_drop0p25"),
    (BaselineSpec(), "nnAlignOriginal"),
    (BaselineSpec(modality_dropout=0.5), "nnAlignOriginal_drop0p5"),
    (TeacherSpec("mixture", 0.0), "nnAlignTeacher_mixture_w0_drop0p5"),
    (TeacherSpec("normal", latent_level=2), "nnAlignTeacher_normal_lvl2"),
    (TeacherSpec("none", latent_level=0), "nnAlignTeacher_none_lvl0"),  # given explicitly: not the plans' level
    (TeacherSpec("modality:t2f", 0.5, False, 0.3, False, 1),
     "nnAlignTeacher_modalityFLAIR_w0p5_sep_lvl1_drop0p3_nosg"),
    (TeacherSpec("mixture", modality_dropout=0.5, subset_sampling="balanced"), "nnAlignTeacher_mixture_drop0p5_bal"),
    (TeacherSpec("modality", modality_dropout=0.5, subset_sampling="balanced", stop_gradient=False),
     "nnAlignTeacher_modalityT1ce_drop0p5_bal_nosg"),
    (BaselineSpec(modality_dropout=0.5, subset_sampling="balanced"), "nnAlignOriginal_drop0p5_bal"),
])
def test_teacher_name_encodes_the_spec_and_inverts_exactly(spec, name):
    assert spec.trainer_name() == name
    assert re.fullmatch(r"[A-Za-z0-9_]+", name)
    assert TeacherSpec.parse(name) == spec == parse_trainer_name(name)
    assert spec.variant == "_".join(name.split("_")[1 if spec.is_original else 2:])


def test_every_anchor_and_option_round_trips_and_every_name_is_distinct():
    anchors = [*(a for a in TEACHER_ANCHORS if a != "modality"), *(f"modality:{m}" for m in BRATS_MODALITIES)]
    specs, names = set(), set()
    for anchor, w, shared, p, sg, level, sampling, distance in itertools.product(
            anchors, (None, 0.0, 0.123456789, 10.0), (True, False), (None, 0.0, 0.5, 1 / 3), (True, False),
            (None, 0, 2), SUBSET_SAMPLINGS, ALIGN_DISTANCES):
        try:
            spec = teacher_spec(anchor, align_weight=w, shared_encoder=shared, modality_dropout=p, stop_gradient=sg,
                                latent_level=level, subset_sampling=sampling, align_distance=distance)
        except NnalignError:
            continue
        name = spec.trainer_name()
        assert TeacherSpec.parse(name) == spec, name
        specs.add(spec)
        names.add(name)
    assert len(names) == len(specs)  # distinct specs, distinct names
    kinds = {TeacherSpec.parse(n).anchor_kind for n in names}
    assert kinds == set(TEACHER_ANCHORS) and set(ANCHORS.names) < kinds
    assert len(names) > 500


@pytest.mark.parametrize("name", [
    "nnAlignTeacher", "nnAlignTeacher_", "nnAlignTeacher_bogus", "nnAlignTeacher_modalityT5", "nnAlignTeacher_modality",
    "nnAlignTeacher_mixture_w0p1",  # the default written out is not canonical
    "nnAlignTeacher_mixture_drop0p3_w0p5",  # tokens out of order
    "nnAlignTeacher_mixture_nosg", "nnAlignTeacher_none_w0p5", "nnAlignOriginal_sep", "nnAlignTeacher_mixture_drop1",
    "nnAlignTeacher_mixture_wabc", "nnAlignTeacher_modalityt1ce", "nnAlignTeacherTrainer", "nnAlignTeacher_original",
    "nnAlignTeacher_mixture_drop0p3_lvl1", "nnAlignTeacher_mixture_lvl01", "nnAlignTeacher_mixture_lvl",
    "nnAlignOriginal_lvl1",
    "nnAlignTeacher_mixture_bal",  # balanced sampling without dropout
    "nnAlignTeacher_mixture_bal_drop0p5", "nnAlignTeacher_mixture_drop0p5_bal_bal",
    "nnAlignTeacher_mixture-scaled", "nnAlignTeacher_mixtureScaled", "nnAlignTeacher_mixture_scaled",
    "nnAlignTeacher_mixture_rel_drop0p5",  # tokens out of order
    "nnAlignTeacher_none_rel", "nnAlignTeacher_normal_rel", "nnAlignOriginal_rel", "nnAlignTeacher_mixture_rel_rel",
])
def test_teacher_names_not_made_by_trainer_name_are_refused(name):
    with pytest.raises(ValueError):
        TeacherSpec.parse(name)
    with pytest.raises(ValueError):
        parse_trainer_name(name)


@pytest.mark.parametrize("kwargs, message", [
    ({"anchor": "bogus"}, "unknown anchor"),
    ({"anchor": "modality:T5"}, "unknown modality"),
    ({"anchor": "modality:"}, "names no modality"),
    ({"anchor": "mixture:T1"}, "takes no"),
    ({"align_weight": -1.0}, ">= 0"),
    ({"align_weight": float("nan")}, "finite"),
    ({"modality_dropout": 1.0}, "[0, 1)"),
    ({"anchor": "mixture", "stop_gradient": False}, "anchor 'mixture' has no anchor modality, so --no-stop-gradient "
                                                    "has no effect"),
    ({"anchor": "none", "align_weight": 0.5}, "no effect"),
    ({"anchor": "original", "shared_encoder": False}, "no effect"),
    ({"latent_level": -1}, "whole number >= 0"),
    ({"latent_level": 1.5}, "whole number >= 0"),
    ({"anchor": "original", "latent_level": 1}, "no latents"),
    ({"anchor": "normal", "align_distance": "relative"}, "no distance loss"),
    ({"anchor": "original", "align_distance": "relative"}, "no distance loss"),
    ({"align_distance": "cosine"}, "unknown alignment distance 'cosine' (one of mse, relative)"),
    ({"anchor": "mixture-scaled", "stop_gradient": False}, "has no anchor modality"),
    ({"anchor": "original", "stop_gradient": False}, "anchor 'original' has no anchor modality"),
    ({"anchor": "original", "align_weight": 0.5}, "anchor 'original' has no alignment loss, so --align-weight has no "
                                                  "effect"),
])
def test_bad_teacher_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(NnalignError, match=re.escape(message)) as info:
        teacher_spec(**kwargs)
    assert "\n" not in str(info.value)


def test_the_unknown_anchor_message_lists_every_run_anchor():
    with pytest.raises(NnalignError) as info:
        teacher_spec("bogus")
    assert str(info.value) == ("unknown anchor 'bogus' (choose from none, normal, modality:NAME, mixture, "
                               "mixture-scaled, original)")
    with pytest.raises(NnalignError, match="unknown anchor 'original'"):
        TeacherSpec("original")  # the baseline is not an anchor: teacher_spec makes it


def test_the_default_modality_dropout_is_the_anchors_and_names_always_spell_it():
    """P*'s weights learn only through the fill of missing modalities, so P* trains with dropout by default; a name
    without ``_drop`` still means no dropout, for every anchor, as it did before that default."""
    dropout = {kind.name: kind.modality_dropout for kind in ANCHOR_KINDS.values()}
    assert dropout == {"none": 0.0, "normal": 0.0, "modality": 0.0, "mixture": 0.5, "mixture-scaled": 0.0}
    assert BaselineSpec().modality_dropout == 0.0
    for anchor in [*TEACHER_ANCHORS]:
        spec = teacher_spec(anchor)
        assert spec.modality_dropout == dropout.get(spec.anchor_kind, 0.0)
        assert TeacherSpec.parse(teacher_spec(anchor, modality_dropout=0.0).trainer_name()).modality_dropout == 0.0
    assert TeacherSpec("mixture").train_flags() == ["--anchor", "mixture"]
    assert TeacherSpec("mixture", modality_dropout=0.0).train_flags() == ["--anchor", "mixture", "--modality-dropout",
                                                                          "0.0"]


def test_the_alignment_distance_is_named_and_flagged_only_when_not_the_papers():
    assert ALIGN_DISTANCES[0] == "mse" and TeacherSpec("modality").align_distance == "mse"
    relative = TeacherSpec("mixture-scaled", align_distance="relative")
    assert relative.trainer_name().endswith("_rel") and relative.train_flags()[-2:] == ["--align-distance", "relative"]
    assert relative.model_settings()["align_distance"] == "relative"
    assert "--align-distance" not in TeacherSpec("modality").train_flags()
    student = StudentSpec(("T1ce",), "pmkl", relative)
    assert student.trainer_name() == "nnAlignStudent_T1ce_pmkl_Teacher-mixturescaled-rel"
    assert StudentSpec.parse(student.trainer_name()).teacher == relative


# ----------------------------------------------------------------------------------------------------------------------
# students


@pytest.mark.parametrize("spec, name", [
    (StudentSpec(("T1ce",), "kdnet", P_STAR), "nnAlignStudent_T1ce_kdnet_Teacher-mixture"),
    (StudentSpec(("T2", "t1"), "none", P_STAR), "nnAlignStudent_T1-T2_none_Teacher-mixture"),
    (StudentSpec(("T1ce", "T2", "FLAIR"), "ProtoKD", TeacherSpec("modality", 0.5), "1"),
     "nnAlignStudent_T1ce-T2-FLAIR_protokd_Teacher-modalityT1ce-w0p5_tf1"),
    (StudentSpec(("FLAIR",), "smunet", BaselineSpec(), "all"), "nnAlignStudent_FLAIR_smunet_Original_tfall"),
])
def test_student_name_encodes_subset_method_and_teacher(spec, name):
    assert spec.trainer_name() == name
    assert re.fullmatch(r"[A-Za-z0-9_-]+", name)
    parsed = StudentSpec.parse(name)
    assert parsed == parse_trainer_name(name)
    assert (parsed.modalities, parsed.kd, parsed.teacher, parsed.teacher_fold) == (
        spec.modalities, spec.kd, spec.teacher, spec.teacher_fold)
    assert parsed.overrides is None  # the values are in the settings record, not the name


def test_every_subset_method_teacher_fold_and_override_round_trips():
    teachers = (P_STAR, TeacherSpec("modality:FLAIR", 0.5, False, 0.3, False), BaselineSpec())
    names = set()
    for subset, kd, teacher, fold, overrides in itertools.product(
            all_subsets(BRATS_MODALITIES), KD_METHODS, teachers, (None, "0", "3", "all"), ({}, {"temperature": 4.0})):
        spec = StudentSpec(subset, kd, teacher, fold, overrides)
        name = spec.trainer_name()
        parsed = StudentSpec.parse(name)
        assert parsed.with_overrides(overrides) == spec, name
        assert ("_tf" in name) == (fold is not None) and ("_x" in name) == bool(overrides), name
        names.add(name)
    assert len(names) == 15 * len(KD_METHODS) * 3 * 4 * 2  # all distinct


def test_overrides_hash_ignores_order_and_tells_settings_apart():
    def name(overrides):
        return StudentSpec(("T2",), "protokd", P_STAR, None, overrides).trainer_name()

    a = name({"proto_weight": 0.2, "kd_weight": 5.0})
    assert a == name({"kd_weight": 5.0, "proto_weight": 0.2})
    assert re.fullmatch(r"nnAlignStudent_T2_protokd_Teacher-mixture_x[0-9a-f]{8}", a)
    assert a.endswith(overrides_hash({"kd_weight": 5.0, "proto_weight": 0.2}))
    others = {name({"proto_weight": 0.2}), name({"proto_weight": 0.3}), name({"kd_weight": 5.0}),
              name({"proto_weight": 0.2, "kd_weight": 6.0}), name({})}
    assert a not in others and len(others) == 5
    assert name({}) == "nnAlignStudent_T2_protokd_Teacher-mixture"


def test_overrides_from_the_record_must_match_the_name():
    parsed = StudentSpec.parse(StudentSpec(("T2",), "pmkl", P_STAR, None, {"temperature": 4.0}).trainer_name())
    assert parsed.with_overrides({"temperature": 4.0}).overrides == {"temperature": 4.0}
    for wrong in ({"temperature": 2.0}, {}):
        with pytest.raises(NnalignError, match="hash to"):
            parsed.with_overrides(wrong)
    with pytest.raises(NnalignError, match="hash to"):  # a name without x<hash>: no overrides
        StudentSpec.parse("nnAlignStudent_T2_pmkl_Teacher-mixture").with_overrides({"temperature": 4.0})


@pytest.mark.parametrize("name", [
    "nnAlignStudent_T2-T1_none_Teacher-mixture",  # not in channel order
    "nnAlignStudent_FLAIR-T1ce_kdnet_Teacher-mixture",
    "nnAlignStudent_t1ce_kdnet_Teacher-mixture",  # an alias is not the canonical tag
    "nnAlignStudent_T1ce_KDNet_Teacher-mixture",  # nor is an upper-case method
    "nnAlignStudent_T5_kdnet_Teacher-mixture", "nnAlignStudent__kdnet_Teacher-mixture",
    "nnAlignStudent_T1ce_fitnet_Teacher-mixture", "nnAlignStudent_T1ce_kdnet_Teacher-bogus",
    "nnAlignStudent_T1ce_kdnet_Teacher-mixture-w0p1", "nnAlignStudent_T1ce_kdnet_Teacher-mixture_x12",
    "nnAlignStudent_T1ce_kdnet_Teacher-mixture_x0123abcd_tf1",  # parts out of order
    "nnAlignStudent_T1ce_kdnet_Teacher-mixture_tf1_tf2", "nnAlignStudent_T1ce_kdnet_Teacher-mixture_extra",
    "nnAlignStudent_T1ce_kdnet", "nnAlignStudent",
])
def test_student_names_not_made_by_trainer_name_are_refused(name):
    with pytest.raises(ValueError):
        StudentSpec.parse(name)
    with pytest.raises(ValueError):
        parse_trainer_name(name)


def test_bad_student_settings_are_one_line_errors():
    with pytest.raises(NnalignError, match=r"unknown KD method 'fitnet' \(known: none, kdnet, pmkl, protokd, smunet\)"):
        StudentSpec(("T1ce",), "fitnet", P_STAR)
    with pytest.raises(NnalignError, match="unknown modality"):
        StudentSpec(("T5",), "kdnet", P_STAR)
    with pytest.raises(NnalignError, match="empty"):
        StudentSpec((), "kdnet", P_STAR)


def test_other_trainer_names_are_not_nnaligns():
    assert parse_trainer_name("nnUNetTrainer") is None and parse_trainer_name("nnUNetTrainer_250epochs") is None


# ----------------------------------------------------------------------------------------------------------------------
# training-only settings


def test_training_length_comes_from_the_record_and_is_checked():
    assert TrainingLength.from_record({"epochs": 3, "iters_per_epoch": 5, "anchor": "mixture"}) == TrainingLength(3, 5)
    assert TrainingLength.from_record(None) == TrainingLength() == TrainingLength.from_record({"epochs": None})
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(NnalignError, match="positive integer"):
            TrainingLength(epochs=bad)
