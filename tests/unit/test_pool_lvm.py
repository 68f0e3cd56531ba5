"""LvmPool's pure parts: LV naming, argv building, JSON report parsing, error mapping.

The JSON samples follow the format LVM 2.03 prints for ``--reportformat json --units b
--nosuffix`` (numbers as strings, "" for fields that do not apply); the thick-LV and VG
samples are verbatim output of lvm 2.03.16 on a loop device.
"""

from __future__ import annotations

import pytest

from replication.command import CommandError, CommandTimeout
from replication.errors import InvalidReplicaIdError, PoolError, PoolFullError
from replication.pool.base import open_pool
from replication.pool.lvm import (
    LvmPool,
    LvReport,
    VgReport,
    build_blkdiscard_argv,
    build_lvcreate_argv,
    build_lvextend_argv,
    build_lvremove_argv,
    build_lvs_argv,
    build_vgs_argv,
    dm_name,
    is_insufficient_space,
    lv_name_for,
    parse_lvs,
    parse_vgs,
    round_up,
    volume_id_of,
)

MIB = 1 << 20

LVS_MIXED = """\
  {
      "report": [
          {
              "lv": [
                  {"lv_name":"pool0", "lv_size":"1073741824", "lv_path":"", "data_percent":"12.50", "lv_attr":"twi-aotz--"},
                  {"lv_name":"root", "lv_size":"8589934592", "lv_path":"/dev/vg0/root", "data_percent":"", "lv_attr":"-wi-ao----"},
                  {"lv_name":"tandem-pvc-1", "lv_size":"4194304", "lv_path":"/dev/vg0/tandem-pvc-1", "data_percent":"", "lv_attr":"-wi-a-----"},
                  {"lv_name":"tandem-pvc-2", "lv_size":"2147483648", "lv_path":"/dev/vg0/tandem-pvc-2", "data_percent":"25.00", "lv_attr":"Vwi-aotz--"}
              ]
          }
      ]
  }
"""  # noqa: E501

LVS_EMPTY = """\
  {
      "report": [
          {
              "lv": [
              ]
          }
      ]
  }
"""

# lvm.conf log/report_command_log=1 puts the command log next to the report.
LVS_WITH_LOG = """\
  {
      "report": [
          {
              "lv": [
                  {"lv_name":"tandem-a", "lv_size":"8388608", "lv_path":"/dev/vg0/tandem-a", "data_percent":"", "lv_attr":"-wi-XX----"}
              ]
          }
      ]
      ,
      "log": [
          {"log_seq_num":"1", "log_type":"status", "log_context":"processing", "log_object_type":"cmd", "log_object_name":"", "log_object_id":"", "log_object_group":"", "log_object_group_id":"", "log_message":"success", "log_errno":"0", "log_ret_code":"1"}
      ]
  }
"""  # noqa: E501

VGS = """\
  {
      "report": [
          {
              "vg": [
                  {"vg_size":"62914560", "vg_free":"58720256", "vg_extent_size":"4194304"}
              ]
          }
      ]
  }
"""

# Verbatim stderr of lvm 2.03.16 (LC_ALL=C).
LVCREATE_FULL = '  Volume group "tdmexp" has insufficient free space (15 extents): 256 required.\n'
LVEXTEND_FULL = "  Insufficient free space: 254 extents needed, but only 13 available\n"
LVCREATE_EXISTS = '  Logical Volume "tandem-a" already exists in volume group "tdmexp"\n'


# -- names ---------------------------------------------------------------------------------


def test_lv_names_carry_the_prefix_and_round_trip() -> None:
    assert lv_name_for("pvc-1", "vg0") == "tandem-pvc-1"
    assert volume_id_of("tandem-pvc-1") == "pvc-1"
    assert volume_id_of("root") is None
    assert volume_id_of("tandem-") is None
    assert volume_id_of("tandem-x+y") is None  # an LV we could not have made


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "x" * 200, "."])
def test_invalid_ids_are_refused(bad: str) -> None:
    with pytest.raises(InvalidReplicaIdError):
        lv_name_for(bad, "vg0")


@pytest.mark.parametrize("reserved", ["x_tmeta", "a_pmspare", "v_rimage_0", "a_vorigin", "b_mlog"])
def test_ids_lvm_reserves_are_refused(reserved: str) -> None:
    with pytest.raises(InvalidReplicaIdError, match="reserved by LVM"):
        lv_name_for(reserved, "vg0")


def test_dm_name_doubles_dashes_and_bounds_the_id_length() -> None:
    assert dm_name("vg-a", "tandem-x") == "vg--a-tandem--x"
    # "vg0-tandem--" is 12 characters, leaving 115 of the 127 for the id.
    assert lv_name_for("a" * 115, "vg0") == "tandem-" + "a" * 115
    with pytest.raises(InvalidReplicaIdError, match="too long"):
        lv_name_for("a" * 116, "vg0")
    with pytest.raises(InvalidReplicaIdError, match="too long"):
        lv_name_for("a-" * 50, "vg0")  # 100 characters, 150 once dashes are doubled


def test_round_up_to_extents() -> None:
    assert round_up(4096, 4 * MIB) == 4 * MIB
    assert round_up(4 * MIB, 4 * MIB) == 4 * MIB
    assert round_up(4 * MIB + 4096, 4 * MIB) == 8 * MIB


# -- argv ----------------------------------------------------------------------------------


def test_lvcreate_thick() -> None:
    assert build_lvcreate_argv("vg0", "tandem-a", 8 * MIB) == [
        "lvcreate", "-y", "--wipesignatures", "y", "-L", "8388608b", "-n", "tandem-a", "vg0",
    ]  # fmt: skip


def test_lvcreate_thin() -> None:
    assert build_lvcreate_argv("vg0", "tandem-a", 8 * MIB, thin_pool="pool0") == [
        "lvcreate", "-y", "-V", "8388608b", "-T", "vg0/pool0", "-n", "tandem-a",
    ]  # fmt: skip


def test_other_argv() -> None:
    assert build_lvremove_argv("vg0", "tandem-a") == ["lvremove", "-y", "vg0/tandem-a"]
    assert build_lvextend_argv("vg0", "tandem-a", 12 * MIB) == [
        "lvextend", "-L", "12582912b", "vg0/tandem-a",
    ]  # fmt: skip
    report = ["--reportformat", "json", "--units", "b", "--nosuffix", "-o"]
    assert build_lvs_argv("vg0") == [
        "lvs", *report, "lv_name,lv_size,lv_path,data_percent,lv_attr", "vg0",
    ]  # fmt: skip
    assert build_lvs_argv("vg0", "pool0")[-1] == "vg0/pool0"
    assert build_vgs_argv("vg0") == ["vgs", *report, "vg_size,vg_free,vg_extent_size", "vg0"]
    assert build_blkdiscard_argv("/dev/vg0/tandem-a", 4096, 8192) == [
        "blkdiscard", "-f", "-o", "4096", "-l", "8192", "/dev/vg0/tandem-a",
    ]  # fmt: skip


# -- parsing -------------------------------------------------------------------------------


def test_parse_lvs_mixed_volume_group() -> None:
    rows = parse_lvs(LVS_MIXED)
    assert rows[0] == LvReport("pool0", 1 << 30, "", 12.5, "twi-aotz--")
    assert rows[2] == LvReport("tandem-pvc-1", 4 * MIB, "/dev/vg0/tandem-pvc-1", None, "-wi-a-----")
    assert rows[3].data_percent == 25.0 and rows[3].attr.startswith("V")


def test_parse_lvs_empty_and_with_command_log() -> None:
    assert parse_lvs(LVS_EMPTY) == []
    assert [r.name for r in parse_lvs(LVS_WITH_LOG)] == ["tandem-a"]


def test_parse_lvs_accepts_json_std_numbers() -> None:
    text = '{"report":[{"lv":[{"lv_name":"tandem-a","lv_size":4194304,"lv_path":"/dev/v/tandem-a",'
    text += '"data_percent":null,"lv_attr":"-wi-a-----"}]}]}'
    assert parse_lvs(text)[0].size_bytes == 4 * MIB


@pytest.mark.parametrize(
    "garbage",
    ["", "not json", "[]", '{"report": 3}', '{"report":[{"lv":[{"lv_name":"x"}]}]}',
     '{"report":[{"lv":[{"lv_name":"x","lv_size":"4.00m"}]}]}'],
)  # fmt: skip
def test_parse_lvs_rejects_garbage_as_pool_error(garbage: str) -> None:
    with pytest.raises(PoolError):
        parse_lvs(garbage)


def test_parse_vgs() -> None:
    assert parse_vgs(VGS) == VgReport(62914560, 58720256, 4 * MIB)
    with pytest.raises(PoolError, match="one volume group"):
        parse_vgs('{"report":[{"vg":[]}]}')
    with pytest.raises(PoolError):
        parse_vgs('{"report":[{"vg":[{"vg_size":"1"}]}]}')


# -- error mapping ---------------------------------------------------------------------------


def test_insufficient_space_is_recognised_in_both_spellings() -> None:
    assert is_insufficient_space(LVCREATE_FULL)
    assert is_insufficient_space(LVEXTEND_FULL)
    assert not is_insufficient_space(LVCREATE_EXISTS)
    assert not is_insufficient_space("")


def test_command_failures_map_to_pool_errors() -> None:
    argv = ["lvcreate", "-y", "-L", "1073741824b", "-n", "tandem-big", "tdmexp"]
    full = LvmPool._classify(CommandError(argv, 5, LVCREATE_FULL), "creating replica big")
    assert type(full) is PoolFullError and "insufficient free space" in str(full)
    other = LvmPool._classify(CommandError(argv, 5, LVCREATE_EXISTS), "creating replica a")
    assert type(other) is PoolError
    timed_out = LvmPool._classify(CommandTimeout(argv, 120), "creating replica a")
    assert type(timed_out) is PoolError


def test_constructor_validates_names_and_open_pool_knows_lvm() -> None:
    with pytest.raises(ValueError):
        LvmPool("-vg")
    with pytest.raises(ValueError):
        LvmPool("vg0", thin_pool="a/b")
    pool = open_pool("lvm", vg="vg0", thin_pool="pool0")
    assert isinstance(pool, LvmPool) and pool.kind == "lvm"
