//! Status, sense data and the outcome of one command.
//!
//! Sense data is always the fixed format of SPC (response code 70h, 18 bytes): the disk
//! reports `D_SENSE = 0` in its control mode page, and REQUEST SENSE with `DESC = 1` is
//! refused.

/// Length of fixed-format sense data.
pub const SENSE_LEN: usize = 18;

/// The SCSI status of a completed command (SAM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScsiStatus {
    /// The command completed; `data_in_len`/`data_out_len` say how much moved.
    Good,
    /// The command failed; the sense data says why.
    CheckCondition,
}

impl ScsiStatus {
    /// The status byte on the wire (00h, 02h).
    pub fn code(self) -> u8 {
        match self {
            ScsiStatus::Good => 0x00,
            ScsiStatus::CheckCondition => 0x02,
        }
    }
}

/// Sense keys this disk reports (SPC table "Sense key descriptions").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenseKey {
    /// No error (REQUEST SENSE with nothing pending).
    NoSense,
    /// The backend could not read or write the medium.
    MediumError,
    /// The backend failed in a way that is not about the data (internal target failure).
    HardwareError,
    /// The command or its parameter list was refused.
    IllegalRequest,
    /// A write-type command on a read-only disk.
    DataProtect,
}

impl SenseKey {
    /// The 4-bit code on the wire.
    pub fn code(self) -> u8 {
        match self {
            SenseKey::NoSense => 0x0,
            SenseKey::MediumError => 0x3,
            SenseKey::HardwareError => 0x4,
            SenseKey::IllegalRequest => 0x5,
            SenseKey::DataProtect => 0x7,
        }
    }
}

/// An additional sense code and its qualifier (ASC, ASCQ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asc(pub u8, pub u8);

impl Asc {
    pub const NO_ADDITIONAL_SENSE: Asc = Asc(0x00, 0x00);
    pub const WRITE_ERROR: Asc = Asc(0x0C, 0x00);
    pub const UNRECOVERED_READ_ERROR: Asc = Asc(0x11, 0x00);
    pub const PARAMETER_LIST_LENGTH_ERROR: Asc = Asc(0x1A, 0x00);
    pub const INVALID_COMMAND_OPERATION_CODE: Asc = Asc(0x20, 0x00);
    pub const LBA_OUT_OF_RANGE: Asc = Asc(0x21, 0x00);
    pub const INVALID_FIELD_IN_CDB: Asc = Asc(0x24, 0x00);
    pub const LOGICAL_UNIT_NOT_SUPPORTED: Asc = Asc(0x25, 0x00);
    pub const INVALID_FIELD_IN_PARAMETER_LIST: Asc = Asc(0x26, 0x00);
    pub const WRITE_PROTECTED: Asc = Asc(0x27, 0x00);
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: Asc = Asc(0x39, 0x00);
    pub const INTERNAL_TARGET_FAILURE: Asc = Asc(0x44, 0x00);
}

/// Where an invalid field is (the sense-key specific "field pointer" of ILLEGAL REQUEST).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldPointer {
    /// In the CDB (C/D = 1) or in the parameter list (C/D = 0).
    pub in_cdb: bool,
    /// Byte offset of the field.
    pub byte: u16,
    /// Most significant bit of the field within that byte, if it is not the whole byte.
    pub bit: Option<u8>,
}

/// Sense data: why a command ended in CHECK CONDITION.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: SenseKey,
    pub asc: Asc,
    /// Set for INVALID FIELD IN CDB / IN PARAMETER LIST.
    pub field: Option<FieldPointer>,
}

impl Sense {
    /// Sense without a field pointer.
    pub fn new(key: SenseKey, asc: Asc) -> Self {
        Self {
            key,
            asc,
            field: None,
        }
    }

    /// "Nothing to report" (what REQUEST SENSE returns when no error is pending).
    pub fn no_sense() -> Self {
        Self::new(SenseKey::NoSense, Asc::NO_ADDITIONAL_SENSE)
    }

    /// ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE.
    pub fn invalid_opcode() -> Self {
        Self::new(
            SenseKey::IllegalRequest,
            Asc::INVALID_COMMAND_OPERATION_CODE,
        )
    }

    /// ILLEGAL REQUEST / INVALID FIELD IN CDB, pointing at `byte` (and `bit`).
    pub fn invalid_cdb_field(byte: u16, bit: Option<u8>) -> Self {
        Self {
            key: SenseKey::IllegalRequest,
            asc: Asc::INVALID_FIELD_IN_CDB,
            field: Some(FieldPointer {
                in_cdb: true,
                byte,
                bit,
            }),
        }
    }

    /// ILLEGAL REQUEST / INVALID FIELD IN PARAMETER LIST, pointing at `byte` (and `bit`).
    pub fn invalid_param_field(byte: usize, bit: Option<u8>) -> Self {
        Self {
            key: SenseKey::IllegalRequest,
            asc: Asc::INVALID_FIELD_IN_PARAMETER_LIST,
            field: Some(FieldPointer {
                in_cdb: false,
                byte: u16::try_from(byte).unwrap_or(u16::MAX),
                bit,
            }),
        }
    }

    /// ILLEGAL REQUEST / PARAMETER LIST LENGTH ERROR.
    pub fn param_list_length() -> Self {
        Self::new(SenseKey::IllegalRequest, Asc::PARAMETER_LIST_LENGTH_ERROR)
    }

    /// ILLEGAL REQUEST / LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub fn lba_out_of_range() -> Self {
        Self::new(SenseKey::IllegalRequest, Asc::LBA_OUT_OF_RANGE)
    }

    /// DATA PROTECT / WRITE PROTECTED.
    pub fn write_protected() -> Self {
        Self::new(SenseKey::DataProtect, Asc::WRITE_PROTECTED)
    }

    /// The 18 bytes of fixed-format sense data (current error, response code 70h).
    pub fn to_fixed(&self) -> [u8; SENSE_LEN] {
        let mut s = [0u8; SENSE_LEN];
        s[0] = 0x70;
        s[2] = self.key.code();
        // Additional sense length: the bytes after byte 7.
        s[7] = (SENSE_LEN - 8) as u8;
        s[12] = self.asc.0;
        s[13] = self.asc.1;
        if let Some(f) = self.field {
            // SKSV | C/D | BPV | bit pointer, then the field pointer.
            let mut b = 0x80;
            if f.in_cdb {
                b |= 0x40;
            }
            if let Some(bit) = f.bit {
                b |= 0x08 | (bit & 0x07);
            }
            s[15] = b;
            s[16..18].copy_from_slice(&f.byte.to_be_bytes());
        }
        s
    }
}

/// What [`ScsiDisk::execute`](crate::ScsiDisk::execute) did with one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// GOOD or CHECK CONDITION.
    pub status: ScsiStatus,
    /// Bytes at the front of the data-in buffer that hold the command's data (to be copied
    /// to the guest). Never more than the buffer; 0 on CHECK CONDITION.
    pub data_in_len: usize,
    /// Bytes of the data-out buffer the command consumed; 0 on CHECK CONDITION.
    pub data_out_len: usize,
    /// Bytes of the buffers not transferred:
    /// `(data_in.len() - data_in_len) + (data_out.len() - data_out_len)`. A command moves
    /// data one way only, so this is the residual of whichever buffer the transport gave.
    pub residual: usize,
    /// Why the command failed; `Some` exactly when the status is CHECK CONDITION.
    pub sense: Option<Sense>,
}

impl Outcome {
    /// The outcome of a command that moved `data_in_len`/`data_out_len` bytes out of
    /// buffers of `in_cap`/`out_cap` bytes (`Ok`), or failed (`Err`).
    pub(crate) fn from_result(result: Result<Xfer, Sense>, in_cap: usize, out_cap: usize) -> Self {
        match result {
            Ok(x) => {
                let data_in_len = x.data_in.min(in_cap);
                let data_out_len = x.data_out.min(out_cap);
                Outcome {
                    status: ScsiStatus::Good,
                    data_in_len,
                    data_out_len,
                    residual: (in_cap - data_in_len) + (out_cap - data_out_len),
                    sense: None,
                }
            }
            Err(sense) => Outcome {
                status: ScsiStatus::CheckCondition,
                data_in_len: 0,
                data_out_len: 0,
                residual: in_cap.saturating_add(out_cap),
                sense: Some(sense),
            },
        }
    }

    /// Fixed-format sense data to return with CHECK CONDITION (autosense), if any.
    pub fn sense_data(&self) -> Option<[u8; SENSE_LEN]> {
        self.sense.map(|s| s.to_fixed())
    }
}

/// Bytes a successful command moved, in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Xfer {
    pub data_in: usize,
    pub data_out: usize,
}

impl Xfer {
    pub(crate) const NONE: Xfer = Xfer {
        data_in: 0,
        data_out: 0,
    };

    pub(crate) fn data_in(n: usize) -> Self {
        Xfer {
            data_in: n,
            data_out: 0,
        }
    }

    pub(crate) fn data_out(n: usize) -> Self {
        Xfer {
            data_in: 0,
            data_out: n,
        }
    }
}

/// Copy as much of `response` as the allocation length and the buffer allow (a short
/// allocation length or buffer truncates the data, as real disks do); returns the count.
pub(crate) fn put(data_in: &mut [u8], response: &[u8], alloc_len: usize) -> usize {
    let n = response.len().min(alloc_len).min(data_in.len());
    data_in[..n].copy_from_slice(&response[..n]);
    n
}
